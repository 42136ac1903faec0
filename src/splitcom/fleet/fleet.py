"""A heterogeneous fleet in simulation: each client's device, its cut (fixed, memory_fit or adaptive)
and the simulated clock. The rounds loop asks it for the initial cuts, hands it each step's jobs
and, between rounds, lets it move cuts (DESIGN 4.7)."""

from __future__ import annotations

import math

from splitcom.federation.setup import Setup, tail_layers
from splitcom.fleet.clock import SimClock
from splitcom.fleet.cuts import adaptive_cuts, memory_fit


class Fleet:
    def __init__(self, s: Setup):
        cfg = s.cfg
        self.cfg, self.n = cfg, cfg.federation.num_clients
        self.tail = tail_layers(cfg)
        self.targets = tuple(cfg.model.lora.target_modules or s.split.family.lora_targets)
        self.clock = SimClock.from_config(cfg, s.split.lm.config, self.n)
        self.max_cut = s.split.num_layers - 1 - self.tail  # the server keeps at least one block
        batch_tokens = cfg.train.batch_size * cfg.data.max_length
        policy = cfg.split.cut_policy
        # Deepest cut each device can hold (memory_fit raises, naming the device, if not even one block fits).
        self.limits = [min(self.max_cut, memory_fit(self.clock.arch, d, batch_tokens, cfg.model.lora.rank,
                                                    self.targets)) for d in self.clock.devices] \
            if policy != "fixed" else [self.max_cut] * self.n
        if policy == "memory_fit":
            self.cuts = list(self.limits)
        else:
            self.cuts = [min(cfg.split.cut_layer, lim) for lim in self.limits]
        self.history: list[list[int]] = [list(self.cuts)]

    def job(self, cid: int, batch, up: int, down: int):
        return self.clock.job(cid, self.cuts[cid], self.tail, batch.num_tokens, batch.input_ids.shape[1], up, down)

    def predicted_step(self, cid: int, cut: int) -> float:
        """Uncontended seconds of one step at ``cut`` (a typical batch, fp32 on the wire)."""
        tokens, seq = self.cfg.train.batch_size * self.cfg.data.max_length // 2, self.cfg.data.max_length
        nbytes = tokens * self.clock.arch.hidden * 4
        j = self.clock.job(cid, cut, self.tail, tokens, seq, nbytes, nbytes)
        return j.arrival + j.service + j.tail

    def state_dict(self) -> dict:
        return {"cuts": list(self.cuts), "history": self.history, "now": self.clock.now,
                "makespans": self.clock.step_makespans}

    def load_state_dict(self, st: dict) -> None:
        self.cuts, self.history = list(st["cuts"]), [list(h) for h in st["history"]]
        self.clock.now, self.clock.step_makespans = st["now"], list(st["makespans"])

    def adapt(self, scores: list[float]) -> list[int]:
        """SplitFT rule on per-client scores (the client's mean training loss this round; lower is better)."""
        if self.cfg.split.cut_policy != "adaptive":
            return self.cuts
        scores = [s if math.isfinite(s) else float("nan") for s in scores]
        self.cuts = adaptive_cuts(self.cuts, scores, higher_is_better=False, mem_limits=self.limits,
                                  step_time=self.predicted_step, straggler_factor=self.cfg.split.straggler_factor)
        self.history.append(list(self.cuts))
        return self.cuts
