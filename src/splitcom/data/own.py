"""Your own data: ``jsonl:FILE``, ``csv:FILE`` and ``hf:DIR``, read into :class:`Example` rows.

Columns are named by ``data.fields``: ``prompt`` and ``completion`` (the loss is on the completion alone,
as for every dataset), or ``messages``: a chat, ``[{"role", "content"}, ...]``, whose last message is the
assistant's reply (the completion) and whose earlier messages are the prompt. A chat prompt is rendered
at tokenisation (``tokenize.render``), where the tokenizer and its chat template are known;
``Example.prompt`` holds its plain ``role: content`` rendering, the key the references of one input
group by. Other scalar columns become the example's attrs, so ``data.partition.by`` can use them.

Validation rows: ``data.eval_file`` (a second file of the same kind), else ``data.eval_fraction`` of the
distinct prompts held out with the run seed, else an ``hf:`` dataset's own validation/test split, else
10% held out. A bad row is reported as ``FILE:LINE: what`` (``DIR['split'][i]: what`` for ``hf:``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from splitcom.config import DataCfg, FieldsCfg
from splitcom.data.records import Example
from splitcom.errors import UserError

KINDS = ("jsonl", "csv", "hf")
DEFAULT_EVAL_FRACTION = 0.1
DEV_SPLITS = ("validation", "test")  # an hf: dataset's own dev split, the first one present
# Extensions that name a kind: catch `jsonl:data.csv`, and hint at `jsonl:` for a bare `data.jsonl`.
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}

Rows = Iterable[tuple[str, dict]]  # (where, row); where is FILE:LINE or DIR['split'][i]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"not valid UTF-8 ({err.reason})", where=f"{path}:{line}") from None


def read_jsonl(path: Path) -> tuple[Rows, None]:
    # A line loop over the json module, by hand: a bad line must be reported by its number, which the
    # `datasets` JSON reader does not give.
    rows = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        hint = " (jsonl: wants one JSON object per line, not a JSON array)" if line.lstrip()[:1] == "[" else ""
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"not valid JSON ({err.msg}, column {err.colno}){hint}", where=where) from None
        if not isinstance(row, dict):
            raise UserError(f"not a JSON object (got {type(row).__name__}){hint}", where=where)
        rows.append((where, row))
    return rows, None


def read_csv(path: Path) -> tuple[Rows, None]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    rows = []
    try:
        for row in reader:  # line_num: the file line the row ends on (a quoted cell may span lines)
            rows.append((f"{path}:{reader.line_num}", row))
    except csv.Error as err:
        raise UserError(f"not valid CSV ({err})", where=f"{path}:{reader.line_num}") from None
    return rows, None


def read_hf(path: Path) -> tuple[Rows, Rows | None]:
    """A ``save_to_disk`` directory, or a directory of data files (split names from the file names)."""
    import datasets

    if not path.is_dir():
        raise UserError("directory not found (data.dataset)", where=str(path))
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    datasets.disable_progress_bars()
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)  # it logs a failure before raising; we report it once
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        cause = " ".join(str(err.__cause__ or err).split())  # the cause says which file and why
        raise UserError(f"`datasets` cannot load it ({cause})", where=str(path)) from None
    finally:
        datasets.logging.set_verbosity(level)
    splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if "train" in splits:
        train = "train"
    elif len(splits) == 1:
        train = next(iter(splits))
    else:
        raise UserError(f"no 'train' split (splits: {sorted(splits)})", where=str(path))
    dev = next((name for name in DEV_SPLITS if name in splits and name != train), None)

    def rows(name: str) -> Rows:
        return ((f"{path}[{name!r}][{i}]", row) for i, row in enumerate(splits[name]))

    return rows(train), rows(dev) if dev else None


READERS: dict[str, Callable[[Path], tuple[Rows, Rows | None]]] = {
    "jsonl": read_jsonl, "csv": read_csv, "hf": read_hf,
}


def _field(where: str, row: dict, name: str) -> object:
    value = row.get(name)
    if value is None:  # a short CSV row and a key absent from some hf rows both read as None
        have = ", ".join(str(k) for k, v in row.items() if k is not None and v is not None)
        raise UserError(f"no field {name!r} (the row has: {have or 'nothing'})", where=where)
    return value


def _text(where: str, row: dict, name: str) -> str:
    value = _field(where, row, name)
    if not isinstance(value, (str, int, float)):
        raise UserError(f"field {name!r} is not text (got {type(value).__name__})", where=where)
    return str(value).strip()


def _attrs(row: dict, used: set[str]) -> dict[str, str]:
    return {str(k): str(v) for k, v in row.items()
            if k is not None and k not in used and isinstance(v, (str, int, float))}


def plain_chat(turns: tuple[tuple[str, str], ...]) -> str:
    """The prompt of a chat for a tokenizer without a chat template: ``role: content`` lines."""
    return "".join(f"{role}: {content}\n" for role, content in turns) + "assistant:"


def _chat_example(where: str, row: dict, name: str) -> Example:
    chat = _field(where, row, name)
    if isinstance(chat, str):  # a CSV cell holds the chat as a JSON string
        try:
            chat = json.loads(chat)
        except json.JSONDecodeError as err:
            raise UserError(f"field {name!r} is not a list of {{role, content}} messages (a string, and not "
                            f"one in JSON: {err.msg})", where=where) from None
    if not isinstance(chat, list) or not chat:
        raise UserError(f"field {name!r} is not a non-empty list of {{role, content}} messages", where=where)
    turns = []
    for k, message in enumerate(chat):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise UserError(f"message {k} of {name!r} needs a string 'role' and 'content' "
                            f"(got {repr(message)[:80]})", where=where)
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise UserError(f"the last message of {name!r} is from {turns[-1][0]!r}; it must be the assistant's "
                        "reply (the completion)", where=where)
    completion = turns[-1][1].strip()
    if not completion:
        raise UserError(f"empty completion (the last message of {name!r})", where=where)
    prompt_turns = tuple(turns[:-1])
    plain = plain_chat(prompt_turns)
    return Example(prompt=plain, completion=completion, group=plain, attrs=_attrs(row, {name}),
                   chat=prompt_turns)


def to_example(where: str, row: dict, fields: FieldsCfg) -> Example:
    if fields.messages is not None:
        return _chat_example(where, row, fields.messages)
    prompt = _text(where, row, fields.prompt)
    completion = _text(where, row, fields.completion)
    if not completion:
        raise UserError(f"empty completion (field {fields.completion!r})", where=where)
    return Example(prompt=prompt, completion=completion, group=prompt,
                   attrs=_attrs(row, {fields.prompt, fields.completion}))


def read(kind: str, arg: str, fields: FieldsCfg, key: str) -> tuple[list[Example], list[Example] | None]:
    """(rows, the dataset's own dev rows or None) of one ``kind:arg``; ``key`` is the config key naming it."""
    path = Path(arg)
    if kind != "hf":
        named = EXTENSIONS.get(path.suffix.lower())
        if named is not None and named != kind:
            raise UserError(f"a {path.suffix} file given as {kind}: (did you mean {named}:{arg}?)", where=key)
        if not path.is_file():
            raise UserError(f"file not found ({key})", where=str(path))
    train_rows, dev_rows = READERS[kind](path)
    train = [to_example(where, row, fields) for where, row in train_rows]
    if not train:
        raise UserError(f"no rows ({key})", where=str(path))
    dev = None if dev_rows is None else [to_example(where, row, fields) for where, row in dev_rows]
    return train, dev


def holdout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, dev): ``fraction`` of the distinct prompts, drawn with ``seed``, go to dev with all their rows."""
    groups = list(dict.fromkeys(ex.group for ex in examples))
    if len(groups) < 2:
        raise UserError("one distinct prompt only: nothing to hold out for validation; give data.eval_file",
                        where="data.eval_fraction")
    n_dev = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    dev_groups = set(random.Random(seed).sample(groups, n_dev))
    return ([ex for ex in examples if ex.group not in dev_groups],
            [ex for ex in examples if ex.group in dev_groups])


def load(kind: str, arg: str | None, seed: int, data: DataCfg) -> tuple[list[Example], list[Example]]:
    """(train, validation) of ``kind:arg`` with the options of ``data`` (fields, eval_file, eval_fraction)."""
    if not arg:
        what = "DIR" if kind == "hf" else "FILE"
        raise UserError(f"{kind} needs a {'directory' if kind == 'hf' else 'file'}: {kind}:{what}",
                        where="data.dataset")
    train, dev = read(kind, arg, data.fields, "data.dataset")
    if data.eval_file is not None:
        eval_rows, eval_dev = read(kind, data.eval_file, data.fields, "data.eval_file")
        dev = eval_dev if eval_dev is not None else eval_rows
    elif data.eval_fraction is not None or dev is None:
        train, dev = holdout(train, data.eval_fraction or DEFAULT_EVAL_FRACTION, seed)
    if not dev:
        raise UserError("no validation rows", where=data.eval_file or arg)
    return train, dev


def hint(spec: str) -> str:
    """For an unknown dataset spec that is a bare path: the spelling that reads it."""
    if ":" in spec:
        return ""
    named = EXTENSIONS.get(Path(spec).suffix.lower())
    if named is not None:
        return f" (a file? write {named}:{spec})"
    return f" (a directory? write hf:{spec})" if Path(spec).is_dir() else ""
