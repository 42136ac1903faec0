"""A heterogeneous fleet in simulation: each client's device, its cut (fixed, memory_fit or adaptive)
and the simulated clock. The rounds loop asks it for the initial cuts, hands it each step's jobs
and, between rounds, lets it move cuts (DESIGN 4.7)."""

from __future__ import annotations

import math

from splitcom.compress.plan import state_bytes_per_sample, stream_plan
from splitcom.config import Config
from splitcom.errors import UserError
from splitcom.federation.setup import tail_layers
from splitcom.fleet.clock import SimClock
from splitcom.fleet.cuts import WHERE, _gib, adaptive_cuts, memory_fit
from splitcom.fleet.schedule import Job
from splitcom.fleet.timemodel import client_memory_bytes, full_model_memory_bytes
from splitcom.models.split import family_for


class Fleet:
    def __init__(self, cfg: Config, model_config, samples: list[int] | None = None):
        """``model_config``: the HF config of the whole model (a deployed client knows its cuts before it
        loads its blocks); ``samples``: each client's training samples, for the stream state it keeps
        (temporal reuse's mirrors and copies, prompt prefixes: ``state_bytes``), which must fit its device
        beside its blocks."""
        self.cfg, self.n = cfg, cfg.federation.num_clients
        per_sample = state_bytes_per_sample(stream_plan(cfg, "client"), int(model_config.hidden_size),
                                            cfg.data.max_length) if cfg.federation.mode == "sfl" else 0
        self.state_bytes = [per_sample * k for k in samples] if samples is not None else [0] * self.n
        self.tail = tail_layers(cfg)
        self.targets = tuple(cfg.model.lora.target_modules or family_for(model_config).lora_targets)
        self.clock = SimClock.from_config(cfg, model_config, self.n)
        self.num_layers = int(model_config.num_hidden_layers)
        self.max_cut = self.num_layers - 1 - self.tail  # the server keeps at least one block
        batch_tokens = cfg.train.batch_size * cfg.data.max_length
        policy = cfg.split.cut_policy
        self.local = cfg.federation.mode == "fl"  # federated LoRA: every device trains the whole model
        self.local_s: dict[int, float] = {}  # FL: each client's training seconds in the round so far
        if self.local:
            self.cuts = [self.num_layers] * self.n  # a "cut" past the last block: the client runs everything
            self.limits = list(self.cuts)
            self.history = [list(self.cuts)]
            self._check_full_model(model_config, batch_tokens)
            return
        self.tail_bytes = self._tail_bytes(model_config, batch_tokens)
        self._check_state(batch_tokens)
        # Deepest cut each device can hold beside its stream state and U-shape's tail (memory_fit raises, naming
        # the device, if not even one block fits).
        self.limits = [min(self.max_cut, memory_fit(self.clock.arch, d, batch_tokens, cfg.model.lora.rank,
                                                    self.targets, reserve_bytes=state + self.tail_bytes))
                       for d, state in zip(self.clock.devices, self.state_bytes, strict=True)] \
            if policy != "fixed" else [self.max_cut] * self.n
        if policy == "memory_fit":
            self.cuts = list(self.limits)
        else:
            self.cuts = [min(cfg.split.cut_layer, lim) for lim in self.limits]
        self.history: list[list[int]] = [list(self.cuts)]

    @classmethod
    def of(cls, s) -> Fleet:
        """The fleet of a prepared run (federation/setup.py ``Setup``), with each client's training samples."""
        return cls(s.cfg, s.split.lm.config, [len(p) for p in s.partitions])

    def _tail_bytes(self, model_config, batch_tokens: int) -> float:
        """What a U-shape client holds beyond its head blocks: the tail blocks (weights, LoRA state, saved
        activations), the LM head unless tied to the embedding, and the logits with their gradient."""
        if not self.tail:
            return 0.0
        arch, rank = self.clock.arch, self.cfg.model.lora.rank
        blocks = client_memory_bytes(arch, 1 + self.tail, batch_tokens, rank, self.targets) - \
            client_memory_bytes(arch, 1, batch_tokens, rank, self.targets)
        head = 0.0 if getattr(model_config, "tie_word_embeddings", False) else arch.vocab * arch.hidden * 4.0
        return blocks + head + 2.0 * arch.vocab * batch_tokens * 4.0

    def _check_state(self, batch_tokens: int) -> None:
        """A client's stream state grows with its data (a full tensor per sample and stream kept in memory): it
        must leave room for the shallowest cut's blocks, else the device would run out of memory mid-run."""
        blocks = client_memory_bytes(self.clock.arch, 1, batch_tokens, self.cfg.model.lora.rank,
                                     self.targets) + self.tail_bytes
        for cid, (d, state) in enumerate(zip(self.clock.devices, self.state_bytes, strict=True)):
            if state and state + blocks > d.memory_bytes:
                hint = "set compression.temporal.store: disk (mirrors and copies on flash; summaries and prompt " \
                    "prefixes stay in memory), or " if self.cfg.compression.temporal.store == "memory" else ""
                raise UserError(
                    f"client {cid}'s device {d.name!r} has {_gib(d.memory_bytes)} for training, but the stream state "
                    f"it would keep in memory for its training samples (summaries, temporal reuse's DELTA mirror and "
                    f"copies, prompt prefixes: up to {_gib(state)}) and its blocks ({_gib(blocks)}) do not fit: "
                    f"{hint}give it fewer samples", where=WHERE)

    def _check_full_model(self, model_config, batch_tokens: int) -> None:
        """Federated LoRA: every device must hold the whole model and its LoRA training state."""
        self.full_model_bytes = need = full_model_memory_bytes(self.clock.arch, batch_tokens, self.cfg.model.lora.rank, self.targets,
                                       tied_head=bool(getattr(model_config, "tie_word_embeddings", False)))
        for cid, d in enumerate(self.clock.devices):
            if need > d.memory_bytes:
                raise UserError(f"client {cid}'s device {d.name!r} has {_gib(d.memory_bytes)} for training but the "
                                f"whole model with its LoRA training state ({batch_tokens} tokens/batch) needs "
                                f"{_gib(need)}: federation.mode=fl holds every block on every device", where=WHERE)

    def job(self, cid: int, batch, up: int, down: int) -> Job:
        """One client's step as a job (FL: its local seconds, as the job's tail: no server takes part)."""
        if self.local:
            return Job(cid, 0.0, 0.0, self.clock.local_step(cid, batch.num_tokens, batch.input_ids.shape[1]))
        return self.clock.job(cid, self.cuts[cid], self.tail, batch.num_tokens, batch.input_ids.shape[1], up, down)

    def step(self, jobs: list[Job]) -> None:
        """One round-robin step: SFL's jobs go through the server's schedule; FL's run on their devices alone
        and count at the round's end (``aggregation``)."""
        if not self.local:
            self.clock.step(jobs)
        elif jobs:
            for j in jobs:
                self.local_s[j.cid] = self.local_s.get(j.cid, 0.0) + j.tail
            self.clock.step_makespans.append(max(j.tail for j in jobs))

    def aggregation(self, up: dict[int, int], down: dict[int, int]) -> None:
        """The round's adapter exchange (``up``/``down``: each client's bytes since its last step)."""
        if self.local:
            self.clock.local_round(self.local_s, up, down)
            self.local_s = {}
        else:
            self.clock.aggregation(up, down)

    def predicted_step(self, cid: int, cut: int) -> float:
        """Uncontended seconds of one step at ``cut`` (a typical batch, fp32 on the wire)."""
        tokens, seq = self.cfg.train.batch_size * self.cfg.data.max_length // 2, self.cfg.data.max_length
        nbytes = tokens * self.clock.arch.hidden * 4
        j = self.clock.job(cid, cut, self.tail, tokens, seq, nbytes, nbytes)
        return j.arrival + j.service + j.tail

    def memory_estimates(self) -> list[int]:
        """Each client's device memory by the time model: the whole model's LoRA training (FL), or its head
        blocks at its current cut, U-shape's tail, LM head and logits, and its stream state (SFL)."""
        if self.local:
            return [int(self.full_model_bytes)] * self.n
        batch_tokens = self.cfg.train.batch_size * self.cfg.data.max_length
        return [int(client_memory_bytes(self.clock.arch, cut, batch_tokens, self.cfg.model.lora.rank, self.targets)
                    + self.tail_bytes) + state for cut, state in zip(self.cuts, self.state_bytes, strict=True)]

    def state_dict(self) -> dict:
        return {"cuts": list(self.cuts), "history": self.history, "now": self.clock.now,
                "makespans": self.clock.step_makespans, "local_s": dict(self.local_s)}

    def load_state_dict(self, st: dict) -> None:
        self.cuts, self.history = list(st["cuts"]), [list(h) for h in st["history"]]
        self.clock.now, self.clock.step_makespans = st["now"], list(st["makespans"])
        self.local_s = {int(k): v for k, v in st.get("local_s", {}).items()}

    def adapt(self, scores: list[float]) -> list[int]:
        """SplitFT rule on per-client scores (the client's mean training loss this round; lower is better)."""
        if self.cfg.split.cut_policy != "adaptive":
            return self.cuts
        scores = [s if math.isfinite(s) else float("nan") for s in scores]
        self.cuts = adaptive_cuts(self.cuts, scores, higher_is_better=False, mem_limits=self.limits,
                                  step_time=self.predicted_step, straggler_factor=self.cfg.split.straggler_factor)
        self.history.append(list(self.cuts))
        return self.cuts
