"""Server step logic: one frozen base, per-client (or one shared) adapters for blocks [k_i, L).

Transport-agnostic: ``handle_bytes`` takes the bytes of one message from an authenticated client id
and returns the bytes of the reply. A bad message gets an ``error`` control reply naming the field;
it never raises out of ``handle_bytes``, and never touches another client's state.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

import torch

from splitcom.compress.adapter_delta import HeldBySender, apply_delta, encode_delta, same_layout
from splitcom.compress.pipeline import (
    add_counts,
    cache_state,
    end_counts,
    load_cache_state,
    set_end_counts,
    stream_ends,
)
from splitcom.compress.plan import SidePlan
from splitcom.data.tokenize import IGNORE, Sample
from splitcom.errors import ProtocolError
from splitcom.evaluate.perplexity import evaluate_loss
from splitcom.federation.aggregate import fedavg, split_by_layer
from splitcom.federation.schedule import LRSchedule, skips_reused_grad
from splitcom.models.adapters import GLOBAL, SLOT, AdapterBank, adapter_optimizer, rank_caps, truncate_ranks
from splitcom.models.split import SplitModel, causal_lm_loss, pad, unpad
from splitcom.protocol import serde
from splitcom.protocol.messages import (
    AdapterMsg,
    ControlMsg,
    LabelsMsg,
    Message,
    Stream,
    TensorMsg,
)

log = logging.getLogger("splitcom.server")
SHARED = "shared"


def client_adapter(cid: int) -> str:
    return f"c{cid}"


class SplitServer:
    def __init__(self, split: SplitModel, bank: AdapterBank, cuts: dict[int, int], plan: SidePlan, *, lr: float,
                 weight_decay: float = 0.0, server_adapters: str = "per_client", device: torch.device | str = "cpu",
                 tail_layers: int = 0, cache_dir: str | None = None, weights: dict[int, float] | None = None,
                 cut_rank: int | None = None, schedule: LRSchedule | None = None, frozen_from: int | None = None,
                 skip_from: int = 0):
        """``plan``: the server side's stream plan (compress/plan.py); ``cache_dir``: where disk stores go;
        ``schedule``: the rate by the global step of each message (None: ``lr`` throughout); ``frozen_from``:
        the global step from which the server's adapters take no step (train.server_epochs; None: never);
        ``skip_from``: the global step from which a plan that skips a REUSEd act_up's gradient does so
        (compression.temporal.skip_from_epoch)."""
        self.split, self.bank, self.cuts, self.plan, self.schedule = split, bank, dict(cuts), plan, schedule
        self.frozen_from, self.skip_from = frozen_from, skip_from
        self.cut_rank = None if server_adapters == "shared" else cut_rank  # (prepare refuses shared + cut rank)
        self.mode, self.device = server_adapters, torch.device(device)
        # FedAvg weights the server knows (sample counts); a client's claim must match, or one client
        # could dominate the average by claiming a huge weight.
        self.weights = dict(weights) if weights is not None else None
        self.num_layers = split.num_layers
        self.ushape = tail_layers > 0
        if self.ushape != (Stream.act_down in plan.sends):
            raise ValueError(f"tail_layers = {tail_layers} and the plan's streams disagree on U-shape")
        self.end = self.num_layers - tail_layers  # the server runs blocks [cut_i, end)
        # Per client: the stream ends (codec + temporal caches keyed by that client's sample ids).
        self.out, self.inc = {}, {}
        for cid in cuts:
            self.out[cid], self.inc[cid] = stream_ends(plan, split.hidden_size,
                                                       None if cache_dir is None else f"{cache_dir}/client{cid}")
        self._lock = threading.Lock()  # the server serves one request at a time
        self.labels: dict[int, dict[int, list[int]]] = {cid: {} for cid in cuts}
        self.pending: dict[int, tuple] = {}  # U-shape: client -> (h_in, h_out, lengths, sample ids, reused)
        self.uploads: dict[int, AdapterMsg] = {}
        self.global_state: dict[str, torch.Tensor] = bank.state(GLOBAL)
        self.round = 0
        # adapter deltas: what each client holds (every client starts from the global adapter)
        self.adapter_delta, self.held = plan.adapter_delta, HeldBySender()
        if self.adapter_delta is not None:
            for cid in self.cuts:
                self.held.put(cid, self.client_slice(cid))
        self.lr, self.weight_decay = lr, weight_decay
        # The model each client's server blocks run on: the one frozen base for everyone, or (the
        # per_client_copies baseline) a whole copy per client, really allocated so memory can be measured.
        self.views: dict[int, tuple[SplitModel, AdapterBank]] = {}
        for cid in self.cuts:
            view = (split, bank)
            if self.mode == "per_client_copies":
                model = bank.copy_model()
                view = (SplitModel(model), AdapterBank(model))
            self.views[cid] = view
            if self.body_adapter(cid) not in view[1].names:
                view[1].add_copy(self.body_adapter(cid), GLOBAL)
            self._cap(cid)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for cid in self.cuts:
            self._optimizer(cid)

    def _optimizer(self, cid: int) -> None:
        name = self.body_adapter(cid)
        params = self.views[cid][1].parameters(name, self.server_layers(None if self.mode == "shared" else cid))
        if params:  # (a federated-LoRA client's cut is past the last block: the server trains nothing for it)
            self.optimizers[name] = adapter_optimizer(params, self.lr, self.weight_decay)
        else:
            self.optimizers.pop(name, None)

    def local(self, cid: int) -> bool:
        """Whether client ``cid`` trains the whole model itself (federation.mode=fl): no step traffic."""
        return self.cuts[cid] >= self.end

    def _cap(self, cid: int) -> None:
        if self.cut_rank is not None:
            self.views[cid][1].cap_ranks(client_adapter(cid), self.rank_caps(cid))

    def rank_caps(self, cid: int) -> dict[int, int]:
        """Blocks whose LoRA rank is capped for this client (next to its cuts)."""
        return rank_caps(self.cut_rank, self.cuts[cid], self.end if self.ushape else None)

    def set_cut(self, cid: int, cut: int) -> None:
        """Move a client's cut at a round boundary: blocks the server gains start from the global adapter."""
        with self._lock:
            self.cuts[cid] = cut
            self._cap(cid)
            self.views[cid][1].load(self.body_adapter(cid),
                                    split_by_layer(self.global_state, set(self.server_layers(cid))))
            self._optimizer(cid)

    def body_adapter(self, cid: int) -> str:
        return SHARED if self.mode == "shared" else client_adapter(cid)

    def server_layers(self, cid: int | None) -> range:
        """Blocks the server runs for a client (None: for any client, the shared adapter's span)."""
        return range(min(self.cuts.values()) if cid is None else self.cuts[cid], self.end)

    def client_layers(self, cid: int) -> set[int]:
        return set(range(self.cuts[cid])) | set(range(self.end, self.num_layers))

    # ---- transport entry point -------------------------------------------------------------
    def handle_bytes(self, client_id: int, data: bytes) -> bytes | None:
        try:
            msg = serde.decode(data)
            if msg.client_id != client_id:
                raise ProtocolError(f"message claims client {msg.client_id} on client {client_id}'s "
                                    "connection", field="header.client_id")
            if client_id not in self.cuts:
                raise ProtocolError(f"unknown client id {client_id}", field="header.client_id")
            with self._lock:
                reply = self.handle(msg)
        except ProtocolError as err:
            log.warning("client %s: rejected message: %s", client_id, err)
            reply = ControlMsg(client_id, 0, "error", {"message": str(err), "field": err.field})
        return None if reply is None else serde.encode(reply)

    def handle(self, msg: Message) -> Message | None:
        if isinstance(msg, TensorMsg | LabelsMsg) and self.local(msg.client_id):
            raise ProtocolError(f"client {msg.client_id} trains the whole model (federation.mode=fl): the server "
                                "takes adapters only", field="stream")
        if isinstance(msg, TensorMsg):
            if msg.stream == Stream.act_up:
                return self.forward_step(msg) if self.ushape else self.train_step(msg)
            if msg.stream == Stream.grad_up and self.ushape:
                return self.backward_step(msg)
            raise ProtocolError(f"server does not accept {msg.stream.name} here", field="stream")
        if isinstance(msg, LabelsMsg):
            if self.ushape:  # U-shape promise: labels never reach the server
                raise ProtocolError("labels are not accepted in U-shape mode", field="header.type")
            self.labels[msg.client_id].update(msg.labels)
            return None
        if isinstance(msg, AdapterMsg):
            if msg.stream != Stream.adapters_up:
                raise ProtocolError("server accepts adapters_up only", field="stream")
            if msg.base:  # a delta: add it to the state this client holds (validated below like any upload)
                held = self.held.get(msg.client_id, msg.base)
                if held is None:
                    raise ProtocolError(f"client {msg.client_id}: no adapter state {msg.base:#x} to add this "
                                        f"delta to", field="base")
                msg = replace(msg, tensors=apply_delta(msg.tensors, held, f"client {msg.client_id}"), base=0)
            self._check_upload(msg)
            self.uploads[msg.client_id] = msg
            return None
        if msg.kind == "join":
            return ControlMsg(msg.client_id, msg.step, "welcome", {
                "cut_layer": self.cuts[msg.client_id], "tail_start": self.end if self.ushape else None,
                "num_layers": self.num_layers, "hidden_size": self.split.hidden_size})
        if msg.kind == "pull_adapters":
            return self.pull(msg)
        raise ProtocolError(f"unknown control kind {msg.kind!r}", field="kind")

    def client_slice(self, cid: int) -> dict[str, torch.Tensor]:
        """The global adapter of the blocks client ``cid`` runs, at its rank caps: what a pull delivers."""
        return truncate_ranks(split_by_layer(self.global_state, self.client_layers(cid)), self.rank_caps(cid))

    def pull(self, msg: ControlMsg) -> AdapterMsg:
        cid, target = msg.client_id, self.client_slice(msg.client_id)
        codec, base = self.plan.adapters.codec, 0
        if self.adapter_delta is not None:
            claimed = msg.body.get("held", 0)
            if not isinstance(claimed, int) or not 0 <= claimed < 2**64:
                raise ProtocolError(f"held must be a 64-bit digest, got {claimed!r}", field="body.held")
            held = self.held.get(cid, claimed) if claimed else None
            if held is not None and same_layout(target, held):
                target, mirror = encode_delta(target, held, self.adapter_delta)
                codec, base = self.adapter_delta, claimed
            else:  # the client holds nothing we know, or other blocks: the adapter itself
                mirror = {n: serde.adapter_roundtrip(t, codec) for n, t in target.items()}
            self.held.put(cid, mirror)
        return AdapterMsg(Stream.adapters_down, cid, self.round, 0.0, target, self.cuts[cid], codec, self.plan.entropy,
                          base)

    def _check_upload(self, msg: AdapterMsg) -> None:
        owned = self.client_slice(msg.client_id)
        if self.weights is not None and msg.weight != self.weights[msg.client_id]:
            raise ProtocolError(f"weight {msg.weight} is not client {msg.client_id}'s "
                                f"{self.weights[msg.client_id]} samples", field="weight")
        if msg.weight <= 0:
            raise ProtocolError(f"weight {msg.weight} must be positive", field="weight")
        missing = sorted(set(owned) - set(msg.tensors))
        if missing:
            raise ProtocolError(f"upload lacks {len(missing)} of the client's matrices, e.g. {missing[0]}",
                                field="tensors")
        for name, t in msg.tensors.items():
            if name not in owned:
                raise ProtocolError(f"client {msg.client_id} does not own {name}", field=f"tensors[{name}]")
            if t.shape != owned[name].shape:
                raise ProtocolError(f"shape {tuple(t.shape)} != {tuple(owned[name].shape)}",
                                    field=f"tensors[{name}]")
            if not torch.isfinite(t).all():
                raise ProtocolError("NaN or Inf", field=f"tensors[{name}]")
        if msg.cut != self.cuts[msg.client_id]:
            raise ProtocolError(f"cut {msg.cut} is not client {msg.client_id}'s cut {self.cuts[msg.client_id]}",
                                field="cut")

    # ---- one training step of one client ---------------------------------------------------
    def _labels(self, msg: TensorMsg) -> torch.Tensor:
        cache, rows = self.labels[msg.client_id], []
        for i, s in enumerate(msg.samples):
            if s.sample_id not in cache:
                raise ProtocolError(f"no labels for sample id {s.sample_id}", field=f"samples[{i}].sample_id")
            lab = cache[s.sample_id]
            if len(lab) != s.length:
                raise ProtocolError(f"length {s.length} != {len(lab)} labels for sample id {s.sample_id}",
                                    field=f"samples[{i}].length")
            rows.append(lab)
        t = max(len(r) for r in rows)
        out = torch.full((len(rows), t), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    def _activations(self, msg: TensorMsg) -> tuple[torch.Tensor, list[int], set[int]]:
        if not msg.samples:
            raise ProtocolError("empty batch", field="samples")
        if any(s.skip for s in msg.samples):
            raise ProtocolError("SKIP is not valid on act_up", field="samples")
        rows = self.inc[msg.client_id][Stream.act_up].decode(msg)
        reused = {s.sample_id for s in msg.samples if s.reuse}
        h = pad(rows).to(self.device).requires_grad_(True)  # [B, T, H] leaf: its grad goes down
        return h, [s.length for s in msg.samples], reused

    def frozen(self, step: int) -> bool:
        """Whether the server's adapters are frozen at global step ``step`` (train.server_epochs)."""
        return self.frozen_from is not None and step >= self.frozen_from

    def _skipped(self, reused: set[int], step: int) -> set[int]:
        """The samples of a batch at global step ``step`` that get no grad_down: the reused ones under
        reused_grad=skip, from skip_from_epoch on."""
        return reused if skips_reused_grad(self.plan.sends[Stream.grad_down].skip_reused, step, self.skip_from) \
            else set()

    def _grad_down(self, cid: int, step: int, h: torch.Tensor, lengths, sids, reused, loss: float) -> TensorMsg:
        skip = self._skipped(reused, step)
        rows = unpad(h.grad, lengths) if h.grad is not None else [torch.zeros(n, h.shape[-1]) for n in lengths]
        return self.out[cid][Stream.grad_down].message(cid, step, sids, rows, loss, skip)

    def _step(self, opt: torch.optim.Optimizer, step: int) -> None:
        """The server's optimizer step of global step ``step``: none once its adapters are frozen."""
        if self.frozen(step):
            return
        if self.schedule is not None:
            self.schedule.apply(opt, step)
        opt.step()

    def train_step(self, msg: TensorMsg) -> TensorMsg:
        """Standard mode: body + loss on the server, one round trip."""
        cid = msg.client_id
        labels = self._labels(msg).to(self.device)  # validate everything before any cache changes
        h, lengths, reused = self._activations(msg)
        split, bank = self.views[cid]
        name = self.body_adapter(cid)
        bank.activate(name, self.server_layers(cid))
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss = causal_lm_loss(split.body(h, lengths, self.cuts[cid]), labels)
        loss.backward()
        self._step(opt, msg.step)
        sids = [s.sample_id for s in msg.samples]
        return self._grad_down(cid, msg.step, h, lengths, sids, reused, float(loss.item()))

    def forward_step(self, msg: TensorMsg) -> TensorMsg:
        """U-shape, first half: blocks [cut, end) forward; the activations go back down."""
        cid = msg.client_id
        h, lengths, reused = self._activations(msg)
        split, bank = self.views[cid]
        bank.activate(self.body_adapter(cid), self.server_layers(cid))
        sids = [s.sample_id for s in msg.samples]
        # frozen, with no grad_down to send: no gradient will flow back, so no graph is kept
        graph = not (self.frozen(msg.step) and self._skipped(reused, msg.step) >= set(sids))
        with torch.set_grad_enabled(graph):
            out = split.run(h, lengths, self.cuts[cid], self.end)
        self.pending[cid] = (h, out, lengths, sids, reused, msg.step)
        return self.out[cid][Stream.act_down].message(cid, msg.step, sids, unpad(out.detach(), lengths))

    def backward_step(self, msg: TensorMsg) -> TensorMsg:
        """U-shape, second half: the client's gradient at the tail cut flows back through the body."""
        cid = msg.client_id
        if cid not in self.pending:
            raise ProtocolError("grad_up without a pending forward for this client", field="stream")
        h, out, lengths, sids, reused, step = self.pending[cid]
        if msg.step != step:
            raise ProtocolError(f"grad_up for step {msg.step}, pending step {step}", field="header.step")
        grads = self.inc[cid][Stream.grad_up].decode(msg, sids)
        # once frozen, a gradient only serves its sample's grad_down: a sample without one may come as SKIP
        unneeded = self._skipped(reused, step) if self.frozen(step) else set()
        for i, (sid, g) in enumerate(zip(sids, grads, strict=True)):
            if g is None and sid not in unneeded:
                why = "for a sample that gets a grad_down" if self.frozen(step) else "before the server's adapters froze"
                raise ProtocolError(f"SKIP is not valid on grad_up {why} (sample id {sid})", field=f"samples[{i}]")
        del self.pending[cid]
        name = self.body_adapter(cid)
        self.views[cid][1].activate(name, self.server_layers(cid))
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        if len(unneeded) < len(sids):  # (all unneeded: the forward kept no graph, and nothing flows back)
            if unneeded:
                grads = [torch.zeros(n, out.shape[-1]) if sid in unneeded else g
                         for sid, g, n in zip(sids, grads, lengths, strict=True)]
            out.backward(pad(grads, out.shape[1]).to(self.device))
        self._step(opt, step)
        return self._grad_down(cid, step, h, lengths, sids, reused, msg.scalar)

    def set_threshold(self, value: float | dict[str, float]) -> None:
        """One threshold for every stream the server sends, or a map by stream name."""
        for ends in self.out.values():
            for stream, end in ends.items():
                end.threshold = value.get(stream.name, end.threshold) if isinstance(value, dict) else value

    def stream_counts(self) -> dict[str, dict[str, int]]:
        """Per stream the server sends, its ends' counters summed over the clients (Outgoing.counts)."""
        return add_counts(*({st.name: e.counts() for st, e in ends.items()} for ends in self.out.values()))

    @property
    def cache_bytes(self) -> int:
        return self.held.nbytes + sum(e.cache_bytes for cid in self.cuts
                                      for e in [*self.out[cid].values(), *self.inc[cid].values()])

    def state_bytes(self) -> dict[str, int]:
        """Measured server state: parameters and buffers of every model it holds (shared storage
        counted once; what is bound into the slot belongs to its adapter), the adapters it trains for
        its blocks, optimizer state, and temporal caches."""
        seen, params = set(), 0
        tensors = [t for bank in {id(b): b for _, b in self.views.values()}.values()
                   for n, t in [*bank.model.named_parameters(), *bank.model.named_buffers()] if f".{SLOT}." not in n]
        tensors += [p for cid in self.cuts for p in self.views[cid][1].parameters(
            self.body_adapter(cid), self.server_layers(None if self.mode == "shared" else cid))]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                params += key[1]
        optim = sum(v.numel() * v.element_size() for opt in self.optimizers.values()
                    for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        return {"parameters": params, "optimizer": optim, "caches": self.cache_bytes,
                "total": params + optim + self.cache_bytes}

    # ---- checkpoint ------------------------------------------------------------------------------
    def banks(self) -> dict[str, AdapterBank]:
        """Every adapter set the server trains, with the bank holding it (one base, or a copy per client)."""
        out: dict[str, AdapterBank] = {}
        for cid in sorted(self.cuts):
            out.setdefault(self.body_adapter(cid), self.views[cid][1])
        return out

    def state_dict(self, caches: bool = False) -> dict:
        """What a restarted server needs to go on from a round boundary: cuts, the global adapter, every
        adapter set it trains with its optimizer state, the round, labels and stream counters; with
        ``caches`` also its stream ends' caches (simulation resumes exactly; a deployment's clients forget
        what they sent when they rejoin, so both sides start their caches afresh there)."""
        with self._lock:
            banks = self.banks()
            return {"cuts": dict(self.cuts), "global": self.global_state, "round": self.round,
                    "adapters": {n: b.state(n, copy=False) for n, b in banks.items()},
                    "optimizers": {n: self.optimizers[n].state_dict() for n in banks if n in self.optimizers},
                    "labels": self.labels, "ends": {cid: end_counts(self.out[cid]) for cid in self.cuts},
                    "held": self.held.state_dict(),
                    **({"caches": {cid: cache_state(self.out[cid], self.inc[cid]) for cid in self.cuts}}
                       if caches else {})}

    def load_state_dict(self, st: dict, where: str | None = None) -> None:
        """``where``: the checkpoint, when the stream caches must be restored (simulation's exact resume)."""
        self.global_state = dict(st["global"])
        self.bank.load(GLOBAL, self.global_state)
        for cid, cut in st["cuts"].items():  # before the adapters: a cut decides which blocks are held
            self.set_cut(int(cid), cut)
        banks = self.banks()
        for name, state in st["adapters"].items():
            banks[name].load(name, state)
            if name in self.optimizers:
                self.optimizers[name].load_state_dict(st["optimizers"][name])
        self.round = st["round"]
        self.labels.update({int(k): dict(v) for k, v in st.get("labels", {}).items()})
        for cid, counts in st.get("ends", {}).items():
            set_end_counts(self.out[int(cid)], counts)
        if self.adapter_delta is not None and "held" in st:
            self.held.load_state_dict(st["held"])
        if where is not None:
            caches = st.get("caches", {})
            for cid in self.cuts:
                load_cache_state(self.out[cid], self.inc[cid], caches.get(cid, {}), where)

    # ---- rounds -----------------------------------------------------------------------------
    def aggregate(self) -> dict[str, torch.Tensor]:
        """Per-layer FedAvg of this round's uploads with the server-held parts, then redistribute."""
        with self._lock:
            contributions = []
            for cid, up in sorted(self.uploads.items()):
                state = dict(up.tensors)
                if self.mode != "shared":
                    state.update(self.views[cid][1].state(client_adapter(cid), self.server_layers(cid), copy=False))
                contributions.append((up.weight, state))
            if self.mode == "shared":  # one copy of the server blocks, already trained on everyone
                for layer in self.server_layers(None):  # weighted by the clients it served at that block
                    w = sum(up.weight for cid, up in self.uploads.items() if layer in self.server_layers(cid))
                    contributions.append((w, self.bank.state(SHARED, [layer], copy=False)))
            if contributions:
                # a block that only capped (cut-rank) copies hold averages to that rank: loading pads it
                # back into the full-rank global adapter
                self.bank.load(GLOBAL, fedavg(contributions))
                self.global_state = self.bank.state(GLOBAL)
                for cid in self.cuts:
                    self.views[cid][1].load(self.body_adapter(cid),
                                            split_by_layer(self.global_state, set(self.server_layers(cid))))
            self.uploads.clear()
            self.round += 1
            return self.global_state

    def evaluate(self, samples: list[Sample], batch_size: int, pad_id: int) -> tuple[float, float]:
        """Validation loss and perplexity of the global adapter on the full model."""
        with self._lock:
            return evaluate_loss(self.split, self.bank, samples, batch_size, pad_id, self.device)
