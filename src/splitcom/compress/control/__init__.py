"""Controllers that pick the temporal-reuse threshold once per control interval (e.g. each epoch).

A sender re-sends a sample's activation when the cosine similarity of its random-projection summary
to last epoch's is below the threshold, else it sends REUSE: a *lower* threshold means more reuse
(aggressive), a higher one less (conservative). Similarities sit very close to 1, so thresholds are
best read as ``1 - threshold`` on a log scale (0.99, 0.999, 0.9999, ...).

rules.py holds the interface and the fixed and bang-bang rules; ddpg.py the learning agent and its
environment. This module is the registry: ``make_controller(name, options)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from splitcom.compress.control.ddpg import DDPGController
from splitcom.compress.control.rules import (
    BangBangController,
    FixedController,
    IntervalStats,
    ThresholdController,
)
from splitcom.errors import UserError

__all__ = ["CONTROLLERS", "BangBangController", "DDPGController", "FixedController", "IntervalStats",
           "ThresholdController", "make_controller"]
WHERE = "compression.temporal.controller"

CONTROLLERS: dict[str, type[ThresholdController]] = {
    "fixed": FixedController,
    "bangbang": BangBangController,
    "ddpg": DDPGController,
}


def make_controller(name: str, cfg: Mapping[str, Any] | None = None, seed: int = 0,
                    **kwargs: Any) -> ThresholdController:
    """Build controller ``name`` from ``cfg`` (a mapping or pydantic model) and/or keyword arguments.

    ``seed`` is passed to controllers that take one (unless ``cfg`` sets it).
    """
    key = str(name).strip().lower()
    if key not in CONTROLLERS:
        raise UserError(f"unknown controller {name!r}; choose one of {', '.join(CONTROLLERS)}", where=WHERE)
    if cfg is not None and hasattr(cfg, "model_dump"):
        cfg = cfg.model_dump()
    params = {**dict(cfg or {}), **kwargs}
    cls = CONTROLLERS[key]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(params) - set(accepted) - {"self"})
    if unknown:
        raise UserError(f"unknown option(s) {unknown} for controller {key!r}; accepted: "
                        f"{sorted(set(accepted) - {'self'})}", where=f"compression.temporal.{key}")
    if "seed" in accepted:
        params.setdefault("seed", seed)
    missing = [p.name for p in list(accepted.values())[1:]
               if p.default is inspect.Parameter.empty and p.name not in params]
    if missing:
        raise UserError(f"controller {key!r} needs option(s) {missing}", where=f"compression.temporal.{key}")
    return cls(**params)
