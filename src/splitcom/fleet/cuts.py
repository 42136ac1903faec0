"""Choosing each client's cut layer: the memory ceiling, and the SplitFT-style adaptive rule.

A deeper cut keeps more of the model (and its adapters) on the client, which SplitFT-style
training rewards for clients that are doing well, but the cut may never exceed what the device can
hold, nor make one client so slow that every round waits for it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

from splitcom.errors import UserError
from splitcom.fleet.devices import DeviceProfile, GiB
from splitcom.fleet.timemodel import ArchSpec, client_memory_bytes

WHERE = "federation.devices"


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def memory_fit(arch: ArchSpec, device: DeviceProfile, batch_tokens: int, lora_rank: int = 0,
               lora_targets: Sequence[str] | None = None, seq_len: int | None = None,
               weight_bytes: float = 4.0, act_bytes: float = 4.0, reserve_bytes: float = 0.0) -> int:
    """Deepest cut in ``[1, L-1]`` whose client memory fits ``device.memory_bytes - reserve_bytes``.

    Raises UserError naming the device when even one block does not fit: silently running a
    shallower split than the memory allows is impossible (a cut needs >= 1 client block), and
    running it anyway would OOM the real device.
    """
    if arch.n_layers < 2:
        raise UserError(f"a split needs at least 2 decoder layers, the model has {arch.n_layers}",
                        where="split.cut_layer")
    budget = device.memory_bytes - reserve_bytes

    def need(k: int) -> float:
        return client_memory_bytes(arch, k, batch_tokens, lora_rank, lora_targets, seq_len,
                                   weight_bytes, act_bytes)

    if need(1) > budget:
        raise UserError(f"device {device.name!r} has {_gib(budget)} for training but the shallowest cut "
                        f"(embeddings + 1 layer, {batch_tokens} tokens/batch) needs {_gib(need(1))}",
                        where=WHERE)
    lo, hi = 1, arch.n_layers - 1  # need() grows with k: bisect for the last k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if need(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def memory_limits(arch: ArchSpec, devices: Sequence[DeviceProfile], batch_tokens: int,
                  **kwargs: object) -> list[int]:
    """``memory_fit`` of every client (same keyword arguments)."""
    return [memory_fit(arch, d, batch_tokens, **kwargs) for d in devices]  # type: ignore[arg-type]


def adaptive_cuts(cuts: Sequence[int], scores: Sequence[float], higher_is_better: bool,
                  mem_limits: Sequence[int], step_time: Callable[[int, int], float] | None = None,
                  straggler_factor: float = 2.0, min_cut: int = 1) -> list[int]:
    """Next round's cuts from this round's validation scores (SplitFT-style).

    A client whose score beats the mean of all finite scores takes one more layer, the others one
    fewer; a score equal to the mean (within 1e-9 relative) keeps its cut, so a fleet of identical
    scores does not shrink every round, and a non-finite score (no evaluation) keeps its cut and is
    left out of the mean. Results are clamped to ``[min_cut, mem_limits[i]]``.

    Straggler bound: with ``step_time(i, k)`` (predicted seconds of client i's step at cut k), a move
    is refused when it would raise the client's predicted step above ``straggler_factor`` times the
    median predicted step of the fleet at this round's cuts. Moves that shorten a step are always
    allowed, so a client already over the bound can still shed layers. The median (not the mean or
    max) is the reference so that one slow outlier cannot loosen the bound for itself.
    """
    n = len(cuts)
    if len(scores) != n or len(mem_limits) != n:
        raise ValueError("cuts, scores and mem_limits must have one entry per client")
    if straggler_factor < 1:
        raise ValueError("straggler_factor must be >= 1 (the median client must satisfy its own bound)")
    for i, m in enumerate(mem_limits):
        if m < min_cut:
            raise ValueError(f"client {i}: memory limit {m} below min_cut {min_cut}")

    def clamp(i: int, k: int) -> int:
        return max(min_cut, min(mem_limits[i], k))

    finite = [float(s) for s in scores if math.isfinite(s)]
    mean = statistics.fmean(finite) if finite else math.nan
    tol = 1e-9 * max(1.0, abs(mean)) if finite else 0.0
    proposed = []
    for i, (k, s) in enumerate(zip(cuts, scores, strict=True)):
        if not math.isfinite(s) or abs(s - mean) <= tol:
            step = 0
        else:
            beats = s > mean if higher_is_better else s < mean
            step = 1 if beats else -1
        proposed.append(clamp(i, k + step))
    if step_time is None:
        return proposed
    now = [step_time(i, clamp(i, k)) for i, k in enumerate(cuts)]
    bound = straggler_factor * statistics.median(now)
    out = []
    for i, k in enumerate(proposed):
        cur = clamp(i, cuts[i])
        t = step_time(i, k)
        out.append(cur if (t > bound and t > now[i]) else k)
    return out
