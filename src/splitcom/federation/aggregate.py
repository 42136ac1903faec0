"""Per-layer FedAvg over adapters that live on different sides and may have different ranks.

Pure functions on ``{canonical name: tensor}`` mappings. A canonical name carries its layer, so
averaging name by name over the contributions that hold it *is* the per-layer average over
heterogeneous cuts: a layer that one client runs itself and the server runs for another is averaged
over both copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from splitcom.models.split import layer_index


def _pad_to(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad every dim up to ``shape`` (a rank-r LoRA matrix into a rank-R slot)."""
    pads: list[int] = []
    for have, want in zip(reversed(t.shape), reversed(shape), strict=True):
        pads += [0, want - have]
    return F.pad(t, pads) if any(pads) else t


def fedavg(contributions: Sequence[tuple[float, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Weighted mean per parameter over the contributions that hold it.

    Shapes that differ (different LoRA ranks) are zero-padded to the largest before averaging.
    """
    if not contributions:
        raise ValueError("fedavg needs at least one contribution")
    if any(w < 0 for w, _ in contributions) or sum(w for w, _ in contributions) <= 0:
        raise ValueError("fedavg weights must be non-negative with a positive sum")
    keys: dict[str, None] = {}
    for _, state in contributions:
        keys.update(dict.fromkeys(state))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        items = [(w, s[key]) for w, s in contributions if key in s]
        total = sum(w for w, _ in items)
        if total <= 0:
            continue  # only zero-weight holders: nothing to average, leave the parameter as it is
        shape = [max(t.shape[d] for _, t in items) for d in range(items[0][1].dim())]
        acc = torch.zeros(shape, dtype=torch.float64)
        for w, t in items:
            acc += w * _pad_to(t.detach().to("cpu", torch.float64), shape)
        out[key] = (acc / total).to(torch.float32)
    return out


def split_by_layer(state: Mapping[str, torch.Tensor], layers: set[int]) -> dict[str, torch.Tensor]:
    """The part of a state whose parameters belong to ``layers``."""
    return {k: v for k, v in state.items() if layer_index(k) in layers}
