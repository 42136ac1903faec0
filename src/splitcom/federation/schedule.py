"""The learning rate over a run (``train.lr_schedule``, ``train.warmup_steps``), by global step.

Every client's step k of an epoch shares one global step number (simulation's round-robin index, deployment's
``RoundSpec.global_step``, the step field of every split message), so the client's optimizer, the server's
optimizer for that client's activations and a deployed client all set the same rate for the same step, and a
resumed run (whose checkpoint holds the global step) goes on with it; nothing else needs saving.

The curves are Hugging Face ``transformers``' ``get_{constant,linear,cosine}_schedule_with_warmup``. They are
written out here because those return a ``LambdaLR`` that counts its own optimizer's steps, and a client with
fewer samples than the largest one (or the server's optimizer of one client) steps fewer times than the run has
global steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LRSchedule:
    lr: float  # train.lr: the peak rate
    kind: str  # constant | linear | cosine
    warmup: int  # global steps of linear warm-up from 0
    total: int  # global steps of the run: train.epochs x the largest client's batches per epoch

    def at(self, step: int) -> float:
        """The rate of global step ``step`` (0-based; clamped to the run)."""
        step = min(max(int(step), 0), self.total)
        if step < self.warmup:
            return self.lr * step / max(1, self.warmup)
        if self.kind == "constant":
            return self.lr
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return self.lr * max(0.0, 1.0 - progress)
        return self.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every parameter group of ``optimizer`` to the rate of ``step`` (before its ``step()``)."""
        lr = self.at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr


def lr_schedule(train, steps_per_epoch: int, epochs: int | None = None) -> LRSchedule | None:
    """The run's schedule from its ``train`` config, or None where the rate is train.lr throughout; ``epochs``:
    the span it decays over (the server's train.server_epochs; None: train.epochs)."""
    if train.lr_schedule == "constant" and train.warmup_steps == 0:
        return None
    return LRSchedule(train.lr, train.lr_schedule, train.warmup_steps, (epochs or train.epochs) * steps_per_epoch)


def server_frozen_from(train, steps_per_epoch: int) -> int | None:
    """The first global step at which the server's adapters are frozen (train.server_epochs), or None."""
    return None if train.server_epochs is None else train.server_epochs * steps_per_epoch


def skip_from(cfg, steps_per_epoch: int) -> int:
    """The first global step at which a REUSEd activation gets no gradient (compression.temporal.reused_grad=skip
    from skip_from_epoch); the stream plan says whether it skips at all."""
    return (cfg.compression.temporal.skip_from_epoch - 1) * steps_per_epoch


def skips_reused_grad(plan_skips: bool, step: int, skip_from_step: int) -> bool:
    """Whether a REUSEd act_up gets no gradient at global step ``step``: the stream plan skips (its grad_down's
    ``skip_reused``) and ``step`` is at or past ``skip_from_step`` (`skip_from`). The rule the server follows when
    it sends grad_down and the U-shape client follows when it leaves grad_up out."""
    return plan_skips and step >= skip_from_step
