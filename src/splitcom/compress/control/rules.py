"""The interface of threshold controllers and its two rules, fixed and bang-bang (the DDPG agent is
ddpg.py).

A sender re-sends a sample's activation when the cosine similarity of its random-projection summary
to last epoch's is below the threshold, else it sends REUSE: a *lower* threshold means more reuse
(aggressive), a higher one less (conservative). Similarities sit very close to 1, so thresholds are
best read as ``1 - threshold`` on a log scale (0.99, 0.999, 0.9999, ...).
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from splitcom.errors import UserError


@dataclass(frozen=True)
class IntervalStats:
    """What happened in the control interval that just finished."""

    progress: float  # fraction of training done, in [0, 1]
    threshold: float  # the threshold used in that interval
    reuse_ratio: float  # fraction of samples sent as REUSE
    val_loss: float  # validation loss measured at the end of the interval
    bytes_sent: int  # bytes actually sent in the interval
    bytes_full: int  # bytes that would have been sent with no reuse

    def __post_init__(self) -> None:
        if not -1e-9 <= self.progress <= 1 + 1e-9:
            raise ValueError(f"progress must be in [0, 1], got {self.progress}")
        if self.bytes_sent < 0 or self.bytes_full < 0:
            raise ValueError(f"byte counts must be >= 0, got {self.bytes_sent}, {self.bytes_full}")

    @property
    def bytes_fraction(self) -> float:
        """``bytes_sent / bytes_full`` (1.0 when nothing would have been sent)."""
        return self.bytes_sent / self.bytes_full if self.bytes_full > 0 else 1.0


class ThresholdController(ABC):
    """Picks the threshold of each control interval: ``initial()`` once, then ``update(stats)``."""

    name: str = ""

    @abstractmethod
    def initial(self) -> float:
        """Threshold for the first interval."""

    @abstractmethod
    def update(self, stats: IntervalStats) -> float:
        """Consume the stats of the interval just finished; return the next interval's threshold."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (for logs and checkpoints)."""

    def save(self, path: str | os.PathLike) -> str:
        """Write ``state_dict()`` as JSON to exactly ``path``; return the path."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.state_dict(), f, indent=2)
        return path


def check(ok: bool, name: str, param: str, msg: str) -> None:
    if not ok:
        raise UserError(msg, where=f"compression.temporal.{name}.{param}")


class FixedController(ThresholdController):
    """Always the same threshold."""

    name = "fixed"

    def __init__(self, threshold: float):
        check(-1.0 <= float(threshold) <= 1.0, "fixed", "threshold", f"must be in [-1, 1], got {threshold}")
        self.threshold = float(threshold)

    def initial(self) -> float:
        return self.threshold

    def update(self, stats: IntervalStats) -> float:
        return self.threshold

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold}


class BangBangController(ThresholdController):
    """Two levels: aggressive (low threshold, more reuse) while validation loss improves, else conservative.

    Exact rule. ``initial()`` returns the ``start`` level. On ``update(stats)`` with ``L = stats.val_loss``
    and reference ``R`` (the previous validation loss if ``reference="previous"``, the best, i.e. lowest,
    one seen so far if ``reference="best"``):

    * no reference yet (first validation): keep the current level;
    * ``L`` finite and ``L <= R * (1 + tolerance)``: loss counts as improving -> next level is aggressive;
    * otherwise (worse, or ``L`` is NaN/inf): next level is conservative.

    Then the previous loss becomes ``L`` and the best becomes ``min(best, L)`` (non-finite ``L`` is not
    recorded). Losses are assumed positive (``tolerance`` scales ``R``).
    """

    name = "bangbang"

    def __init__(self, aggressive: float, conservative: float, tolerance: float = 0.0,
                 start: str = "aggressive", reference: str = "previous"):
        for param, v in (("aggressive", aggressive), ("conservative", conservative)):
            check(-1.0 <= float(v) <= 1.0, self.name, param, f"must be in [-1, 1], got {v}")
        check(float(aggressive) <= float(conservative), self.name, "aggressive",
               f"must be <= conservative ({conservative}): a lower threshold means more reuse, got {aggressive}")
        check(float(tolerance) >= 0.0, self.name, "tolerance", f"must be >= 0, got {tolerance}")
        check(start in ("aggressive", "conservative"), self.name, "start",
               f"must be 'aggressive' or 'conservative', got {start!r}")
        check(reference in ("previous", "best"), self.name, "reference",
               f"must be 'previous' or 'best', got {reference!r}")
        self.aggressive, self.conservative = float(aggressive), float(conservative)
        self.tolerance, self.reference, self.start = float(tolerance), reference, start
        self.level = start
        self.previous: float | None = None
        self.best: float | None = None

    def _threshold(self) -> float:
        return self.aggressive if self.level == "aggressive" else self.conservative

    def initial(self) -> float:
        return self._threshold()

    def update(self, stats: IntervalStats) -> float:
        loss = float(stats.val_loss)
        ref = self.previous if self.reference == "previous" else self.best
        if not math.isfinite(loss):
            self.level = "conservative"
        elif ref is not None:
            self.level = "aggressive" if loss <= ref * (1.0 + self.tolerance) else "conservative"
        if math.isfinite(loss):
            self.previous = loss
            self.best = loss if self.best is None else min(self.best, loss)
        return self._threshold()

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "aggressive": self.aggressive, "conservative": self.conservative,
                "tolerance": self.tolerance, "reference": self.reference, "level": self.level,
                "previous": self.previous, "best": self.best}
