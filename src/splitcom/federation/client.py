"""Client step logic: embeddings + blocks [0, k) with the client's own LoRA, transport-agnostic."""

from __future__ import annotations

import random

import torch

from splitcom.compress.codecs import get_codec
from splitcom.compress.temporal import TemporalSender
from splitcom.data.tokenize import Batch, Sample, collate
from splitcom.errors import ProtocolError
from splitcom.models.adapters import AdapterBank
from splitcom.models.split import SplitModel, pad, unpad
from splitcom.protocol.messages import AdapterMsg, ControlMsg, LabelsMsg, SampleTensor, Stream, TensorMsg
from splitcom.transport.base import Channel


class SplitClient:
    def __init__(self, cid: int, split: SplitModel, bank: AdapterBank, cut: int, channel: Channel,
                 samples: list[Sample], *, lr: float, weight_decay: float = 0.0, codec: str = "fp32",
                 batch_size: int = 8, pad_id: int = 0, seed: int = 0, device: torch.device | str = "cpu",
                 temporal=None):
        self.cid, self.split, self.bank, self.cut, self.channel = cid, split, bank, cut, channel
        self.samples, self.batch_size, self.pad_id, self.seed = list(samples), batch_size, pad_id, seed
        self.codec, self.device = get_codec(codec), torch.device(device)
        self.adapter = f"c{cid}"
        if self.adapter not in bank.names:
            bank.add_copy(self.adapter)
        self.optimizer = torch.optim.AdamW(bank.parameters(self.adapter, range(cut)), lr=lr,
                                           weight_decay=weight_decay)
        self.labels_sent: set[int] = set()  # the server caches labels: each goes up once
        self.tokens_forwarded = 0
        # Temporal reuse of act_up (compress/temporal.py); the threshold is set by the rounds loop.
        self.sender = None if temporal is None or not temporal.enabled else TemporalSender(
            split.hidden_size, temporal.projection_dim, seed, "act_up", temporal.max_reuse_streak)
        self.threshold = temporal.threshold if temporal is not None else 1.0
        self.sent_full = self.sent_reuse = 0  # act_up sample transfers, reset by the rounds loop
        self.bytes_saved = 0  # act_up payload bytes not sent thanks to REUSE

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def epoch_batches(self, epoch: int) -> list[Batch]:
        order = list(self.samples)
        random.Random(f"{self.seed}/{epoch}/{self.cid}").shuffle(order)
        return [collate(order[i : i + self.batch_size], self.pad_id) for i in range(0, len(order), self.batch_size)]

    def join(self) -> dict:
        return self.channel.request(ControlMsg(self.cid, 0, "join", {"num_samples": self.num_samples})).body

    def train_step(self, batch: Batch, step: int) -> float:
        """Forward the head, ship activations, receive their gradient, finish the backward."""
        self.bank.activate(self.adapter, range(self.cut))
        self.optimizer.zero_grad(set_to_none=True)
        h = self.split.head(batch.input_ids.to(self.device), batch.lengths, self.cut)  # [B, T, H]
        self.tokens_forwarded += batch.num_tokens
        new = {sid: batch.labels[i, :n].tolist() for i, (sid, n) in enumerate(zip(batch.sample_ids, batch.lengths,
                                                                                  strict=True))
               if sid not in self.labels_sent}
        if new:
            self.channel.send(LabelsMsg(self.cid, step, new))
            self.labels_sent.update(new)
        rows = unpad(h.detach(), batch.lengths)  # per sample [T_i, H]: no padding on the wire
        msg = TensorMsg(Stream.act_up, self.cid, step, self.codec.name, self.split.hidden_size,
                        [self._encode(sid, n, r) for sid, n, r in zip(batch.sample_ids, batch.lengths, rows,
                                                                      strict=True)])
        reply = self.channel.request(msg)
        if [s.sample_id for s in reply.samples] != batch.sample_ids:
            raise ProtocolError("gradient samples do not match the activations sent", field="samples")
        codec, hidden = get_codec(reply.codec), self.split.hidden_size
        grads = [torch.zeros(s.length, hidden) if s.payload is None else codec.decode(s.payload, s.length, hidden)
                 for s in reply.samples]  # SKIP: no gradient for a reused activation
        h.backward(pad(grads, h.shape[1]).to(self.device))
        self.optimizer.step()
        return reply.scalar

    def _encode(self, sid: int, n: int, row: torch.Tensor) -> SampleTensor:
        if self.sender is not None and self.sender.should_reuse(sid, row, self.threshold):
            self.sender.mark_reused(sid)
            self.sent_reuse += 1
            self.bytes_saved += self.codec.nbytes(n, row.shape[1])
            return SampleTensor(sid, n, None)
        payload = self.codec.encode(row)
        if self.sender is not None:  # remember what the server will hold: the decoded tensor
            self.sender.mark_sent(sid, self.codec.decode(payload, n, row.shape[1]))
        self.sent_full += 1
        return SampleTensor(sid, n, payload)

    @property
    def cache_bytes(self) -> int:
        return 0 if self.sender is None else self.sender.memory_bytes

    def push_adapters(self, round_: int) -> None:
        self.channel.send(AdapterMsg(Stream.adapters_up, self.cid, round_, float(self.num_samples),
                                     self.bank.state(self.adapter, range(self.cut))))

    def pull_adapters(self, round_: int) -> None:
        reply = self.channel.request(ControlMsg(self.cid, round_, "pull_adapters"))
        self.bank.load(self.adapter, reply.tensors)
