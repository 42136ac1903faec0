"""Validation loss / perplexity of the global (aggregated) adapter on the whole model."""

from __future__ import annotations

import math

import torch

from splitcom.data.tokenize import Sample, batches
from splitcom.models.adapters import GLOBAL, AdapterBank
from splitcom.models.split import SplitModel, causal_lm_loss_sum


@torch.no_grad()
def evaluate_loss(split: SplitModel, bank: AdapterBank, samples: list[Sample], batch_size: int, pad_id: int,
                  device: torch.device | str = "cpu", adapter: str = GLOBAL) -> tuple[float, float]:
    """Token-weighted mean completion loss, and its exp (perplexity)."""
    bank.activate(adapter, range(split.num_layers))
    was_training = split.model.training
    split.model.eval()
    total, count = 0.0, 0
    try:
        for b in batches(samples, batch_size, pad_id):
            s, n = causal_lm_loss_sum(split.full(b.input_ids.to(device), b.lengths), b.labels)
            total, count = total + float(s), count + n
    finally:
        split.model.train(was_training)
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50.0))
