"""DART loader (``dart:DIR``): open-domain triple sets -> text, one or more references per input.

``DIR`` holds the release's JSON files, ``dart-v<version>-full-{train,dev}.json``: a list of
``{"tripleset": [[s, p, o], ...], "subtree_was_extended": bool, "annotations": [{"source", "text"}]}``.
The prompt is the linearised triple set (``s | p | o ; ...``, as for WebNLG); one :class:`Example` per
annotation; ``group`` is the entry's position in the file (``dev/17``), so references group per entry
even where two entries share a triple set.

The copy in ``shared/data/dart`` has only the dev file. ``dart:DIR`` as a training dataset then fails
with a clear message: training on dev and validating on the same dev would report meaningless
figures, so it is not allowed. Use DART for evaluation: ``splitcom eval OUT --dataset dart:DIR``
reads the dev file alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from splitcom.data.records import Example
from splitcom.data.webnlg import linearise
from splitcom.errors import UserError

SPLITS = ("train", "dev")


def find_file(directory: str | Path, split: str) -> Path:
    """``DIR/dart-*-full-<split>.json``; exactly one must match."""
    if split not in SPLITS:
        raise UserError(f"unknown DART split {split!r}; known: {list(SPLITS)}", where="--split")
    d = Path(directory)
    if not d.is_dir():
        raise UserError("DART directory not found", where=str(d))
    matches = sorted(d.glob(f"dart-*-full-{split}.json"))
    if not matches:
        hint = ""
        if split == "train":
            hint = ("; this folder has no DART train split, and training on the dev split is not allowed "
                    "(validation would score the training data): use DART for evaluation only, "
                    "e.g. `splitcom eval OUT --dataset dart:DIR`")
        raise UserError(f"DART {split} file not found (expected dart-*-full-{split}.json){hint}",
                        where=str(d))
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        raise UserError(f"several DART {split} files ({names}); keep one version per folder", where=str(d))
    return matches[0]


def _triple(item: object, where: str) -> tuple[str, str, str]:
    ok = isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) and x.strip() for x in item)
    if not ok:
        raise UserError(f"triple {item!r} is not [subject, property, object] strings", where=where)
    return item[0], item[1], item[2]


def parse_entries(data: object, split: str, path: Path) -> list[Example]:
    if not isinstance(data, list):
        raise UserError("top level must be a list of entries", where=str(path))
    out: list[Example] = []
    for i, entry in enumerate(data):
        where = f"{path} (entry {i})"
        if not isinstance(entry, dict):
            raise UserError("entry is not an object", where=where)
        triples = entry.get("tripleset")
        if not isinstance(triples, list) or not triples:
            raise UserError("missing or empty 'tripleset'", where=where)
        prompt = linearise([_triple(t, where) for t in triples])
        annotations = entry.get("annotations")
        if not isinstance(annotations, list) or not annotations:
            raise UserError("missing or empty 'annotations'", where=where)
        for a in annotations:
            text = " ".join(str(a.get("text") or "").split()) if isinstance(a, dict) else ""
            if not text:
                raise UserError("an annotation has no 'text'", where=where)
            attrs = {"source": str(a.get("source", "")), "size": str(len(triples))}
            out.append(Example(prompt=prompt, completion=text, group=f"{split}/{i}", attrs=attrs))
    if not out:
        raise UserError("no entries", where=str(path))
    return out


def load_split(directory: str | Path, split: str) -> list[Example]:
    path = find_file(directory, split)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON ({err.msg})", where=f"{path}:{err.lineno}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"not valid UTF-8 ({err.reason})", where=str(path)) from None
    return parse_entries(data, split, path)


def load(arg: str | None, size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """The ``LOADERS`` entry: (train, dev) of ``dart:DIR``; fails clearly when train is absent."""
    if not arg:
        raise UserError("dart needs a directory: dart:DIR (with dart-*-full-{train,dev}.json)",
                        where="data.dataset")
    dev = load_split(arg, "dev")
    return load_split(arg, "train"), dev
