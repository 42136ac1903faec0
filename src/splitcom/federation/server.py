"""Server step logic: one frozen base, per-client (or one shared) adapters for blocks [k_i, L).

Transport-agnostic: ``handle_bytes`` takes the bytes of one message from an authenticated client id
and returns the bytes of the reply. A bad message gets an ``error`` control reply naming the field;
it never raises out of ``handle_bytes``, and never touches another client's state.
"""

from __future__ import annotations

import logging
import threading

import torch

from splitcom.compress.codecs import get_codec
from splitcom.compress.temporal import TemporalReceiver
from splitcom.data.tokenize import IGNORE, Sample
from splitcom.errors import ProtocolError
from splitcom.evaluate.perplexity import evaluate_loss
from splitcom.federation.aggregate import fedavg, split_by_layer
from splitcom.models.adapters import GLOBAL, AdapterBank
from splitcom.models.split import SplitModel, causal_lm_loss, pad, unpad
from splitcom.protocol import serde
from splitcom.protocol.messages import (
    AdapterMsg,
    ControlMsg,
    LabelsMsg,
    Message,
    SampleTensor,
    Stream,
    TensorMsg,
)

log = logging.getLogger("splitcom.server")
SHARED = "shared"


def client_adapter(cid: int) -> str:
    return f"c{cid}"


class SplitServer:
    def __init__(self, split: SplitModel, bank: AdapterBank, cuts: dict[int, int], *, lr: float,
                 weight_decay: float = 0.0, server_adapters: str = "per_client", grad_codec: str = "fp32",
                 device: torch.device | str = "cpu", temporal=None, cache_dir: str | None = None):
        self.split, self.bank, self.cuts = split, bank, dict(cuts)
        # Temporal reuse: per client, the last FULL activation of every sample id.
        self.reuse = temporal is not None and temporal.enabled
        self.skip_reused_grad = self.reuse and temporal.reused_grad == "skip"
        self.receivers = {cid: TemporalReceiver(temporal.store, None if cache_dir is None else
                                                f"{cache_dir}/client{cid}") for cid in cuts} if self.reuse else {}
        self.mode, self.grad_codec, self.device = server_adapters, grad_codec, torch.device(device)
        self.num_layers = split.num_layers
        self._lock = threading.Lock()  # the server serves one request at a time
        self.labels: dict[int, dict[int, list[int]]] = {cid: {} for cid in cuts}
        self.uploads: dict[int, AdapterMsg] = {}
        self.global_state: dict[str, torch.Tensor] = bank.state(GLOBAL)
        self.round = 0
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        for cid, cut in self.cuts.items():
            name = self.body_adapter(cid)
            if name not in bank.names:
                bank.add_copy(name, GLOBAL)
            if name not in self.optimizers:
                first = min(self.cuts.values()) if self.mode == "shared" else cut
                params = bank.parameters(name, range(first, self.num_layers))
                self.optimizers[name] = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def body_adapter(self, cid: int) -> str:
        return SHARED if self.mode == "shared" else client_adapter(cid)

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
        if isinstance(msg, TensorMsg):
            if msg.stream != Stream.act_up:
                raise ProtocolError(f"server does not accept {msg.stream.name} here", field="stream")
            return self.train_step(msg)
        if isinstance(msg, LabelsMsg):
            self.labels[msg.client_id].update(msg.labels)
            return None
        if isinstance(msg, AdapterMsg):
            if msg.stream != Stream.adapters_up:
                raise ProtocolError("server accepts adapters_up only", field="stream")
            self._check_upload(msg)
            self.uploads[msg.client_id] = msg
            return None
        if msg.kind == "join":
            return ControlMsg(msg.client_id, msg.step, "welcome", {
                "cut_layer": self.cuts[msg.client_id], "num_layers": self.num_layers,
                "hidden_size": self.split.hidden_size})
        if msg.kind == "pull_adapters":
            layers = set(range(self.cuts[msg.client_id]))
            return AdapterMsg(Stream.adapters_down, msg.client_id, self.round, 0.0,
                              split_by_layer(self.global_state, layers))
        raise ProtocolError(f"unknown control kind {msg.kind!r}", field="kind")

    def _check_upload(self, msg: AdapterMsg) -> None:
        owned = split_by_layer(self.global_state, set(range(self.cuts[msg.client_id])))
        for name, t in msg.tensors.items():
            if name not in owned:
                raise ProtocolError(f"client {msg.client_id} does not own {name}", field=f"tensors[{name}]")
            if t.shape != owned[name].shape:
                raise ProtocolError(f"shape {tuple(t.shape)} != {tuple(owned[name].shape)}",
                                    field=f"tensors[{name}]")
            if not torch.isfinite(t).all():
                raise ProtocolError("NaN or Inf", field=f"tensors[{name}]")

    # ---- one training step of one client ---------------------------------------------------
    def _decode_activations(self, msg: TensorMsg) -> list[torch.Tensor]:
        if msg.hidden != self.split.hidden_size:
            raise ProtocolError(f"hidden {msg.hidden} != model hidden {self.split.hidden_size}", field="hidden")
        codec, rows = get_codec(msg.codec), []
        receiver = self.receivers.get(msg.client_id)
        for i, s in enumerate(msg.samples):
            if s.skip:
                raise ProtocolError(f"SKIP is not valid on act_up (sample id {s.sample_id})", field=f"samples[{i}]")
            if s.reuse:
                if receiver is None:
                    raise ProtocolError(f"REUSE for sample id {s.sample_id}, but temporal reuse is off",
                                        field=f"samples[{i}]")
                rows.append(receiver.get(s.sample_id, s.length, field=f"samples[{i}].sample_id"))
                continue
            x = codec.decode(s.payload, s.length, msg.hidden)
            if not torch.isfinite(x).all():
                raise ProtocolError(f"NaN or Inf in sample id {s.sample_id}", field=f"samples[{i}].payload")
            rows.append(x)
        if receiver is not None:  # store only once the whole message is valid: a bad one changes nothing
            for s, x in zip(msg.samples, rows, strict=True):
                if not s.reuse:
                    receiver.put(s.sample_id, x)
        return rows

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

    def train_step(self, msg: TensorMsg) -> TensorMsg:
        if not msg.samples:
            raise ProtocolError("empty batch", field="samples")
        cid, cut = msg.client_id, self.cuts[msg.client_id]
        labels = self._labels(msg).to(self.device)  # validate everything before the cache changes
        rows = self._decode_activations(msg)
        lengths = [s.length for s in msg.samples]
        h = pad(rows).to(self.device).requires_grad_(True)  # [B, T, H] leaf: its grad goes down
        name = self.body_adapter(cid)
        self.bank.activate(name, range(cut, self.num_layers))
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss = causal_lm_loss(self.split.body(h, lengths, cut), labels)
        loss.backward()
        opt.step()
        codec = get_codec(self.grad_codec)
        grads = [SampleTensor(s.sample_id, s.length, None, skip=True) if s.reuse and self.skip_reused_grad
                 else SampleTensor(s.sample_id, s.length, codec.encode(g))
                 for s, g in zip(msg.samples, unpad(h.grad, lengths), strict=True)]
        return TensorMsg(Stream.grad_down, cid, msg.step, codec.name, msg.hidden, grads, float(loss.item()))

    @property
    def cache_bytes(self) -> int:
        return sum(r.memory_bytes for r in self.receivers.values())

    # ---- rounds -----------------------------------------------------------------------------
    def aggregate(self) -> dict[str, torch.Tensor]:
        """Per-layer FedAvg of this round's uploads with the server-held parts, then redistribute."""
        with self._lock:
            contributions = []
            for cid, up in sorted(self.uploads.items()):
                state = dict(up.tensors)
                if self.mode == "per_client":
                    state.update(self.bank.state(client_adapter(cid), range(self.cuts[cid], self.num_layers)))
                contributions.append((up.weight, state))
            if self.mode == "shared":  # one copy of the server blocks, already trained on everyone
                total = sum(up.weight for up in self.uploads.values())
                contributions.append((total, self.bank.state(SHARED, range(min(self.cuts.values()),
                                                                          self.num_layers))))
            if contributions:
                merged = fedavg(contributions)
                self.global_state.update(merged)
                self.bank.load(GLOBAL, self.global_state)
                for cid, cut in self.cuts.items():
                    name = self.body_adapter(cid)
                    self.bank.load(name, split_by_layer(self.global_state, set(range(cut, self.num_layers))))
            self.uploads.clear()
            self.round += 1
            return self.global_state

    def evaluate(self, samples: list[Sample], batch_size: int, pad_id: int) -> tuple[float, float]:
        """Validation loss and perplexity of the global adapter on the full model."""
        with self._lock:
            return evaluate_loss(self.split, self.bank, samples, batch_size, pad_id, self.device)
