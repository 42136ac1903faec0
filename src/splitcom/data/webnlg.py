"""WebNLG 2017 loader (``webnlg:DIR``): RDF triple sets -> text, several references per input.

Layout, as in the challenge release: ``DIR/{train,dev}/{1..7}triples/*.xml``; each file holds
``<entry category=.. eid=.. size=..>`` elements with a ``<modifiedtripleset>`` of ``<mtriple>s | p | o``
lines and one ``<lex>`` per reference text (the 2020+ releases nest the text in ``<lex><text>``; both
are read).

The prompt is the linearised modified triple set, ``s | p | o ; s | p | o``, with DBpedia's
underscores turned into spaces (``Abilene,_Texas`` -> ``Abilene, Texas``) so that entity names read
as the references write them. One :class:`Example` per ``<lex>``; ``group`` is the entry's key
(``category/size/eid``, unique within a split) so the references of one input stay together.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from splitcom.data.records import Example
from splitcom.errors import UserError

SPLITS = ("train", "dev")
_DIGITS = re.compile(r"(\d+)")


def linearise(triples: list[tuple[str, str, str]]) -> str:
    """[(s, p, o), ...] -> ``s | p | o ; s | p | o`` with whitespace collapsed."""
    return " ; ".join(" | ".join(" ".join(part.split()) for part in t) for t in triples)


def split_triple(text: str, where: str) -> tuple[str, str, str]:
    parts = [p.strip().replace("_", " ") for p in text.split(" | ", 2)]  # an object may hold " | "
    if len(parts) != 3 or not all(parts):
        raise UserError(f"triple {text.strip()!r} is not 'subject | property | object'", where=where)
    return parts[0], parts[1], parts[2]


def _natural(path: Path) -> list:
    """Sort key: ``2triples`` before ``10triples`` (numbers compared as numbers)."""
    return [int(tok) if tok.isdigit() else tok for tok in _DIGITS.split(str(path))]


def _lex_text(lex: ET.Element) -> str:
    node = lex.find("text")
    raw = "".join((node if node is not None else lex).itertext())
    return " ".join(raw.split())


def parse_file(path: Path) -> list[Example]:
    """Every lexicalisation in one WebNLG XML file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line = err.position[0] if err.position else 0
        raise UserError(f"not valid XML ({err})", where=f"{path}:{line}") from None
    out: list[Example] = []
    for entry in root.iter("entry"):
        eid = entry.get("eid", "")
        where = f"{path} (entry {eid})"
        category = entry.get("category", "")
        mset = entry.find("modifiedtripleset")
        mtriples = [m.text or "" for m in (mset.findall("mtriple") if mset is not None else [])]
        if not mtriples:
            raise UserError("entry has no <modifiedtripleset>/<mtriple>", where=where)
        triples = [split_triple(t, where) for t in mtriples]
        size = entry.get("size") or str(len(triples))
        texts = [t for t in (_lex_text(lex) for lex in entry.findall("lex")) if t]
        if not texts:
            raise UserError("entry has no <lex> reference text (a test file without references?)",
                            where=where)
        prompt = linearise(triples)
        group = f"{category}/{size}/{eid}"
        attrs = {"category": category, "size": size, "eid": eid}
        out.extend(Example(prompt=prompt, completion=text, group=group, attrs=attrs) for text in texts)
    return out


def load_split(directory: str | Path, split: str) -> list[Example]:
    """All entries of ``DIR/<split>/**/*.xml``, files in natural order (1triples, 2triples, ...)."""
    if split not in SPLITS:
        raise UserError(f"unknown WebNLG split {split!r}; known: {list(SPLITS)}", where="--split")
    root = Path(directory) / split
    if not root.is_dir():
        raise UserError(f"WebNLG {split} folder not found (expected DIR/{split}/<n>triples/*.xml)",
                        where=str(root))
    files = sorted(root.rglob("*.xml"), key=_natural)
    if not files:
        raise UserError(f"no .xml files under the WebNLG {split} folder", where=str(root))
    out: list[Example] = []
    seen: dict[str, Path] = {}
    for path in files:
        examples = parse_file(path)
        for group in dict.fromkeys(e.group for e in examples):
            if group in seen:
                raise UserError(f"entry {group!r} also appears in {seen[group]}", where=str(path))
            seen[group] = path
        out.extend(examples)
    if not out:
        raise UserError(f"no entries in the WebNLG {split} files", where=str(root))
    return out


def load(arg: str | None, size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """The ``LOADERS`` entry: (train, dev) of ``webnlg:DIR``."""
    if not arg:
        raise UserError("webnlg needs a directory: webnlg:DIR (with train/ and dev/)", where="data.dataset")
    return load_split(arg, "train"), load_split(arg, "dev")
