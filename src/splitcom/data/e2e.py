"""E2E NLG challenge loader: ``trainset.csv`` / ``devset.csv`` with columns ``mr,ref``."""

from __future__ import annotations

import csv
from pathlib import Path

from splitcom.data.records import Example, parse_mr
from splitcom.errors import UserError

SPLIT_FILES = {"train": "trainset.csv", "dev": "devset.csv"}


def load_split(directory: str | Path, split: str) -> list[Example]:
    path = Path(directory) / SPLIT_FILES[split]
    if not path.is_file():
        raise UserError(f"E2E {split} file not found (expected {SPLIT_FILES[split]})", where=str(path))
    out: list[Example] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"mr", "ref"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"missing column(s) {sorted(missing)}; found {reader.fieldnames}", where=str(path))
        for lineno, row in enumerate(reader, start=2):
            mr, ref = (row.get("mr") or "").strip(), (row.get("ref") or "").strip()
            if not mr or not ref:
                raise UserError("empty mr or ref", where=f"{path}:{lineno}")
            out.append(Example(prompt=mr, completion=ref, group=mr, attrs=parse_mr(mr)))
    if not out:
        raise UserError("no rows", where=str(path))
    return out
