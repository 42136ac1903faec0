"""Client step logic: embeddings + blocks [0, k) with the client's own LoRA, transport-agnostic.

In U-shape the client also runs blocks [L - tail, L), the final norm, the LM head and the loss, so
token ids and labels never leave it: per step it sends act_up, receives act_down, sends grad_up and
receives grad_down.
"""

from __future__ import annotations

import random

import torch

from splitcom.compress.adapter_delta import apply_delta, digest, same_layout
from splitcom.compress.pipeline import cache_state, end_counts, load_cache_state, set_end_counts, stream_ends
from splitcom.compress.plan import SidePlan
from splitcom.data.tokenize import IGNORE, Batch, Sample, collate
from splitcom.errors import ProtocolError
from splitcom.federation.schedule import LRSchedule, skips_reused_grad
from splitcom.models.adapters import AdapterBank, adapter_optimizer, rank_caps
from splitcom.models.split import SplitModel, causal_lm_loss, pad, unpad
from splitcom.protocol.messages import AdapterMsg, ControlMsg, LabelsMsg, Stream, TensorMsg
from splitcom.transport.base import Channel


def prompt_length(labels: torch.Tensor) -> int:
    """Leading positions without a loss (the prompt) in one sample's labels ``[T]``."""
    scored = (labels != IGNORE).nonzero()
    return int(scored[0]) if len(scored) else int(labels.shape[0])


def epoch_batches(samples: list[Sample], epoch: int, cid: int, seed: int, batch_size: int, pad_id: int) -> list[Batch]:
    """Client ``cid``'s batches of ``epoch``: its samples in a seeded order (the clock replay rebuilds them)."""
    order = list(samples)
    random.Random(f"{seed}/{epoch}/{cid}").shuffle(order)
    return [collate(order[i : i + batch_size], pad_id) for i in range(0, len(order), batch_size)]


class SplitClient:
    def __init__(self, cid: int, split: SplitModel, bank: AdapterBank, cut: int, channel: Channel,
                 samples: list[Sample], plan: SidePlan, *, lr: float, weight_decay: float = 0.0, batch_size: int = 8,
                 pad_id: int = 0, seed: int = 0, device: torch.device | str = "cpu", tail_layers: int = 0,
                 cut_rank: int | None = None, schedule: LRSchedule | None = None,
                 server_frozen_from: int | None = None, skip_from: int = 0):
        """``plan``: the client side's stream plan (compress/plan.py); ``tail_layers``: U-shape's client tail;
        ``schedule``: the rate by global step (None: ``lr`` throughout); ``server_frozen_from``: the global step
        from which the server's adapters are frozen (train.server_epochs; None: never); ``skip_from``: the global
        step from which a plan that skips a REUSEd act_up's gradient does so (compression.temporal.skip_from_epoch)."""
        self.cid, self.split, self.bank, self.cut, self.channel = cid, split, bank, cut, channel
        self.samples, self.batch_size, self.pad_id, self.seed = list(samples), batch_size, pad_id, seed
        self.device = torch.device(device)
        self.ushape = tail_layers > 0
        if self.ushape != (Stream.grad_up in plan.sends):
            raise ValueError(f"tail_layers = {tail_layers} and the plan's streams disagree on U-shape")
        self.tail_start = split.num_layers - tail_layers  # k2: first block of the client's tail
        self.adapter = f"c{cid}"
        if self.adapter not in bank.names:
            bank.add_copy(self.adapter)
        self.lr, self.weight_decay, self.cut_rank, self.plan, self.schedule = lr, weight_decay, cut_rank, plan, schedule
        self.server_frozen_from, self.skip_from = server_frozen_from, skip_from
        self.set_cut(cut)
        self.out, self.inc = stream_ends(plan, split.hidden_size)
        # adapter deltas: the adapter state this client holds as the server knows it (compress/adapter_delta.py)
        self.adapter_delta, self.held, self.held_digest = plan.adapter_delta, None, 0
        self.hold()
        self.labels_sent: set[int] = set()  # standard mode: the server caches labels, each goes up once
        self.tokens_forwarded = 0
        self.noise = None  # privacy.noise on act_up (compress/noise.py), set by make_client

    def hold(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Remember the adapter state the server also has (the start, or what a pull delivered) as the
        base of the next adapter delta."""
        if self.adapter_delta is not None:
            self.held = tensors if tensors is not None else self.bank.state(self.adapter, self.layers)
            self.held_digest = digest(self.held)

    def set_cut(self, cut: int) -> None:
        """(Re)assign the blocks this client runs. At a round boundary every copy equals the global
        adapter, so a handover is: new optimizer here, then ``pull_adapters`` for the new blocks."""
        self.cut = cut
        self.layers = list(range(cut)) + (list(range(self.tail_start, self.split.num_layers)) if self.ushape else [])
        if self.cut_rank is not None:  # the blocks next to the new cut get the cut rank
            self.bank.cap_ranks(self.adapter, rank_caps(self.cut_rank, cut, self.tail_start if self.ushape else None))
        self.optimizer = adapter_optimizer(self.bank.parameters(self.adapter, self.layers), self.lr,
                                           self.weight_decay)

    # kept for the rounds loop: the act_up end is the one the controller steers in standard mode
    @property
    def threshold(self) -> float:
        return self.out[Stream.act_up].threshold

    @threshold.setter
    def threshold(self, value: float | dict[str, float]) -> None:
        """One threshold for every stream this client sends, or a map by stream name."""
        for stream, end in self.out.items():
            end.threshold = value.get(stream.name, end.threshold) if isinstance(value, dict) else value

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def epoch_batches(self, epoch: int) -> list[Batch]:
        return epoch_batches(self.samples, epoch, self.cid, self.seed, self.batch_size, self.pad_id)

    def join(self) -> dict:
        return self.channel.request(ControlMsg(self.cid, 0, "join", {"num_samples": self.num_samples})).body

    def train_step(self, batch: Batch, step: int) -> float:
        """Forward the head, ship activations, (U-shape: run the tail and ship its gradient,) finish backward."""
        self.bank.activate(self.adapter, self.layers)
        self.optimizer.zero_grad(set_to_none=True)
        ids, lengths, sids = batch.input_ids.to(self.device), batch.lengths, batch.sample_ids
        h = self.split.head(ids, lengths, self.cut)  # [B, T, H]
        self.tokens_forwarded += batch.num_tokens
        if not self.ushape:
            new = {sid: batch.labels[i, :n].tolist() for i, (sid, n) in enumerate(zip(sids, lengths, strict=True))
                   if sid not in self.labels_sent}
            if new:
                self.channel.send(LabelsMsg(self.cid, step, new, self.plan.entropy))
                self.labels_sent.update(new)
        # per sample [T_i, H]: no padding on the wire
        # prompt token ids per sample (the leading positions whose label is IGNORE), for prefix sharing
        prompts = [tuple(batch.input_ids[i, : prompt_length(batch.labels[i])].tolist()) for i in range(len(sids))] \
            if self.plan.sends[Stream.act_up].prefix else None
        rows = unpad(h.detach(), lengths)
        if self.noise is not None:  # the defence: before the codec and reuse, so they see what the server sees
            rows = self.noise(rows)
        sent = self.out[Stream.act_up].message(self.cid, step, sids, rows, tokens=prompts)
        reply = self.channel.request(sent)
        loss = reply.scalar
        if self.ushape:  # reply is act_down: run the tail and the loss here, send the gradient up
            h2 = pad(self.inc[Stream.act_down].decode(reply, sids), h.shape[1]).to(self.device).requires_grad_(True)
            out = causal_lm_loss(self.split.logits(self.split.run(h2, lengths, self.tail_start,
                                                                  self.split.num_layers)), batch.labels)
            out.backward()
            loss = float(out.item())
            reply = self.channel.request(self.out[Stream.grad_up].message(self.cid, step, sids,
                                                                          unpad(h2.grad, lengths), loss,
                                                                          self.unneeded_grads(sent, step)))
        grads = self.inc[Stream.grad_down].decode(reply, sids)
        rows = [torch.zeros(n, self.split.hidden_size) if g is None else g for g, n in zip(grads, lengths,
                                                                                           strict=True)]
        h.backward(pad(rows, h.shape[1]).to(self.device))  # SKIP rows: no gradient for a reused activation
        if self.schedule is not None:
            self.schedule.apply(self.optimizer, step)
        self.optimizer.step()
        return loss

    def unneeded_grads(self, act_up: TensorMsg, step: int) -> set[int]:
        """U-shape: the samples whose grad_up goes as SKIP. Once the server's adapters are frozen
        (train.server_epochs) a sample's gradient serves only its grad_down, which a reused act_up does not get
        under reused_grad=skip (from skip_from_epoch on)."""
        if self.server_frozen_from is None or step < self.server_frozen_from \
                or not skips_reused_grad(self.plan.receives[Stream.grad_down].skip_reused, step, self.skip_from):
            return set()
        return {s.sample_id for s in act_up.samples if s.reuse}

    # ---- reuse statistics (act_up, as the controller sees them) ------------------------------
    @property
    def sent_full(self) -> int:
        return self.out[Stream.act_up].sent_full

    @property
    def sent_reuse(self) -> int:
        return self.out[Stream.act_up].sent_reuse

    @property
    def bytes_saved(self) -> int:
        return self.out[Stream.act_up].bytes_saved

    def stream_counts(self) -> dict[str, dict[str, int]]:
        """Per stream this client sends, its end's counters (Outgoing.counts)."""
        return {st.name: e.counts() for st, e in self.out.items()}

    @property
    def cache_bytes(self) -> int:
        held = sum(t.numel() * t.element_size() for t in self.held.values()) if self.held else 0
        return held + sum(e.cache_bytes for e in [*self.out.values(), *self.inc.values()])

    def state_dict(self, caches: bool = False) -> dict:
        """What a restarted client needs at a round boundary (its adapter is the global one there, but a
        shared bank or a cut rank makes its own copy the safe thing to keep)."""
        return {"cut": self.cut, "adapter": self.bank.state(self.adapter, self.layers, copy=False),
                "optimizer": self.optimizer.state_dict(), "labels_sent": sorted(self.labels_sent),
                "tokens_forwarded": self.tokens_forwarded, "ends": end_counts(self.out), "held": self.held,
                **({"caches": cache_state(self.out, self.inc)} if caches else {}),
                **({"noise": self.noise.gen.get_state()} if self.noise is not None else {})}

    def load_state_dict(self, st: dict, where: str | None = None) -> None:
        """``where``: the checkpoint, when its stream caches must be restored (simulation's exact resume)."""
        self.set_cut(st["cut"])
        self.bank.load(self.adapter, st["adapter"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.labels_sent = set(st["labels_sent"])
        self.tokens_forwarded = st["tokens_forwarded"]
        set_end_counts(self.out, st["ends"])
        if st.get("held") is not None:
            self.hold(st["held"])
        if where is not None:
            load_cache_state(self.out, self.inc, st.get("caches", {}), where)
        if self.noise is not None and st.get("noise") is not None:  # privacy.noise goes on with the same draws
            self.noise.gen.set_state(st["noise"])

    def push_adapters(self, round_: int) -> None:
        state, codec, base = self.bank.state(self.adapter, self.layers), self.plan.adapters.codec, 0
        if self.held is not None and same_layout(state, self.held):  # adapter deltas: the change since the pull
            state = {n: t - self.held[n] for n, t in state.items()}
            codec, base = self.adapter_delta, self.held_digest
        self.channel.send(AdapterMsg(Stream.adapters_up, self.cid, round_, float(self.num_samples), state,
                                     self.cut, codec, self.plan.entropy, base))

    def pull_adapters(self, round_: int) -> None:
        """Load the global adapter for this client's blocks; when the server moved the cut (adaptive cuts),
        take the new cut first: the reply covers the new blocks. With adapter deltas the request names
        the state this client holds and the reply may be the change from it."""
        body = {"held": self.held_digest} if self.held is not None else {}
        reply = self.channel.request(ControlMsg(self.cid, round_, "pull_adapters", body))
        tensors = reply.tensors
        if reply.base:
            if self.held is None or reply.base != self.held_digest:
                raise ProtocolError(f"client {self.cid}: an adapter delta to state {reply.base:#x}, which it does "
                                    f"not hold", field="base")
            tensors = apply_delta(tensors, self.held, f"client {self.cid}")
        if reply.cut != self.cut:
            self.set_cut(reply.cut)
        self.bank.load(self.adapter, tensors)
        self.hold(tensors)
