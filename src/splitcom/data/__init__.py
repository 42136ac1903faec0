"""Datasets by spec string: ``synthetic``, ``e2e:DIR``, ``webnlg:DIR``, ``dart:DIR``, or your own data
(``jsonl:FILE``, ``csv:FILE``, ``hf:DIR``; see own.py). Each returns (train, validation) examples."""

from __future__ import annotations

from collections.abc import Callable

from splitcom.config import DataCfg
from splitcom.data import dart, e2e, own, synthetic, webnlg
from splitcom.data.records import Example
from splitcom.errors import UserError


def _synthetic(arg: str | None, size: int, seed: int) -> tuple[list[Example], list[Example]]:
    # Validation inputs come from a disjoint seed stream; attribute combinations may recur, as in E2E.
    return synthetic.generate(size, seed), synthetic.generate(max(size // 5, 30), seed + 10_007)


def _e2e(arg: str | None, size: int, seed: int) -> tuple[list[Example], list[Example]]:
    if not arg:
        raise UserError("e2e needs a directory: e2e:DIR", where="data.dataset")
    return e2e.load_split(arg, "train"), e2e.load_split(arg, "dev")


LOADERS: dict[str, Callable[[str | None, int, int], tuple[list[Example], list[Example]]]] = {
    "synthetic": _synthetic,
    "e2e": _e2e,
    "webnlg": webnlg.load,
    "dart": dart.load,
}


def load_dataset(spec: str, synthetic_size: int = 1200, seed: int = 0,
                 data: DataCfg | None = None) -> tuple[list[Example], list[Example]]:
    """``data`` carries the options of your own data (data.fields, eval_file, eval_fraction); None: defaults."""
    kind, _, arg = spec.partition(":")
    if kind in own.KINDS:
        return own.load(kind, arg or None, seed, data or DataCfg())
    if data is not None and (data.eval_file is not None or data.eval_fraction is not None):
        key = "data.eval_file" if data.eval_file is not None else "data.eval_fraction"
        raise UserError(f"applies to your own data only (jsonl:, csv:, hf:), not {kind!r}", where=key)
    if kind not in LOADERS:
        raise UserError(f"unknown dataset {kind!r}; known: {sorted([*LOADERS, *own.KINDS])}{own.hint(spec)}",
                        where="data.dataset")
    return LOADERS[kind](arg or None, synthetic_size, seed)
