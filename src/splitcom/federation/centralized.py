"""The baseline: the same model, LoRA and data with no split and no federation (plain PEFT)."""

from __future__ import annotations

import random

import torch

from splitcom.data.tokenize import Batch, Sample, collate
from splitcom.federation.schedule import LRSchedule
from splitcom.models.adapters import GLOBAL, AdapterBank
from splitcom.models.split import causal_lm_loss


class CentralizedTrainer:
    def __init__(self, model: torch.nn.Module, bank: AdapterBank, samples: list[Sample], *, lr: float,
                 weight_decay: float = 0.0, batch_size: int = 8, pad_id: int = 0, seed: int = 0,
                 device: torch.device | str = "cpu", schedule: LRSchedule | None = None):
        self.model, self.bank, self.samples, self.schedule = model, bank, list(samples), schedule
        self.batch_size, self.pad_id, self.seed, self.device = batch_size, pad_id, seed, torch.device(device)
        n = bank.model.base_model.model.config.num_hidden_layers
        bank.activate(GLOBAL, range(n))
        self.optimizer = torch.optim.AdamW(bank.parameters(GLOBAL, range(n)), lr=lr, weight_decay=weight_decay)
        self.tokens_forwarded = 0

    def epoch_batches(self, epoch: int) -> list[Batch]:
        order = list(self.samples)
        random.Random(f"{self.seed}/{epoch}/central").shuffle(order)
        return [collate(order[i : i + self.batch_size], self.pad_id) for i in range(0, len(order), self.batch_size)]

    def train_step(self, batch: Batch, step: int) -> float:
        """One step on ``batch``; ``step``: the global step (the learning-rate schedule's clock)."""
        self.tokens_forwarded += batch.num_tokens
        if self.schedule is not None:
            self.schedule.apply(self.optimizer, step)
        return local_step(self.model, self.optimizer, batch, self.device)


def local_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, device: torch.device) -> float:
    """One LoRA step of the whole model on one batch, with whichever adapter is active: the centralized
    baseline's step, and a federated-LoRA client's (federation/fl.py), so the two are the same code."""
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids=batch.input_ids.to(device),  # no KV cache: training, not decoding
                attention_mask=batch.attention_mask.to(device), use_cache=False)
    loss = causal_lm_loss(out.logits, batch.labels)  # [B, T, V] vs [B, T]
    loss.backward()
    optimizer.step()
    return float(loss.item())
