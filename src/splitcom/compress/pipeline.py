"""One stream end: codec + optional temporal reuse, the same object for all four tensor streams.

``Outgoing`` turns per-sample ``[T_i, H]`` rows into FULL/REUSE ``SampleTensor`` records;
``Incoming`` turns a received ``TensorMsg`` back into rows, substituting cached tensors for REUSE.
Each side of each stream owns one (the client sends act_up and, in U-shape, grad_up; the server
sends grad_down and, in U-shape, act_down).
"""

from __future__ import annotations

import torch

from splitcom.compress.codecs import get_codec
from splitcom.compress.temporal import TemporalReceiver, TemporalSender
from splitcom.errors import ProtocolError
from splitcom.protocol.messages import SampleTensor, Stream, TensorMsg


class Outgoing:
    def __init__(self, stream: Stream, codec: str, hidden: int, *, reuse: bool = False, projection_dim: int = 16,
                 seed: int = 0, max_reuse_streak: int | None = None, threshold: float = 1.0,
                 summary_of: str = "source"):
        self.stream, self.codec, self.hidden = stream, get_codec(codec), hidden
        self.sender = TemporalSender(hidden, projection_dim, seed, stream.name, max_reuse_streak) if reuse else None
        self.threshold = threshold
        # `source`: summarise the tensor before the codec, so a lossy codec's own error is not taken for
        # drift (it is there whether or not we resend); `decoded`: summarise what the receiver holds.
        self.summary_of = summary_of
        self.sent_full = self.sent_reuse = 0
        self.bytes_saved = 0  # payload bytes not sent thanks to REUSE

    def encode(self, sample_id: int, row: torch.Tensor) -> SampleTensor:  # row: [T_i, H]
        n = row.shape[0]
        if self.sender is not None and self.sender.should_reuse(sample_id, row, self.threshold):
            self.sender.mark_reused(sample_id)
            self.sent_reuse += 1
            self.bytes_saved += self.codec.nbytes(n, self.hidden)
            return SampleTensor(sample_id, n, None)
        payload = self.codec.encode(row)
        if self.sender is not None:
            self.sender.mark_sent(sample_id, row if self.summary_of == "source"
                                  else self.codec.decode(payload, n, self.hidden))
        self.sent_full += 1
        return SampleTensor(sample_id, n, payload)

    def message(self, client_id: int, step: int, sample_ids, rows, scalar: float = 0.0,
                skip: set[int] | None = None) -> TensorMsg:
        skip = skip or set()
        samples = [SampleTensor(sid, r.shape[0], None, skip=True) if sid in skip else self.encode(sid, r)
                   for sid, r in zip(sample_ids, rows, strict=True)]
        return TensorMsg(self.stream, client_id, step, self.codec.name, self.hidden, samples, scalar)

    @property
    def cache_bytes(self) -> int:
        return 0 if self.sender is None else self.sender.memory_bytes

    @property
    def reuse_ratio(self) -> float:
        return self.sent_reuse / max(self.sent_full + self.sent_reuse, 1)


def end_counts(ends: dict) -> dict[str, list[int]]:
    """The FULL/REUSE/bytes-saved counters of some outgoing stream ends (for a checkpoint)."""
    return {s.name: [e.sent_full, e.sent_reuse, e.bytes_saved] for s, e in ends.items() if isinstance(e, Outgoing)}


def set_end_counts(ends: dict, counts: dict[str, list[int]]) -> None:
    for s, e in ends.items():
        if s.name in counts:
            e.sent_full, e.sent_reuse, e.bytes_saved = counts[s.name]


class Incoming:
    def __init__(self, stream: Stream, hidden: int, *, reuse: bool = False, store: str = "memory",
                 directory: str | None = None):
        self.stream, self.hidden = stream, hidden
        self.receiver = TemporalReceiver(store, directory) if reuse else None

    def decode(self, msg: TensorMsg, sample_ids: list[int] | None = None) -> list[torch.Tensor | None]:
        """Rows of a message (None for SKIP); validates everything before the cache changes."""
        if msg.stream != self.stream:
            raise ProtocolError(f"expected {self.stream.name}, got {msg.stream.name}", field="stream")
        if msg.hidden != self.hidden:
            raise ProtocolError(f"hidden {msg.hidden} != model hidden {self.hidden}", field="hidden")
        if sample_ids is not None and [s.sample_id for s in msg.samples] != list(sample_ids):
            raise ProtocolError("sample ids do not match the request", field="samples")
        codec, rows = get_codec(msg.codec), []
        for i, s in enumerate(msg.samples):
            if s.skip:
                rows.append(None)
            elif s.reuse:
                if self.receiver is None:
                    raise ProtocolError(f"REUSE for sample id {s.sample_id}, but temporal reuse is off on "
                                        f"{self.stream.name}", field=f"samples[{i}]")
                rows.append(self.receiver.get(s.sample_id, s.length, field=f"samples[{i}].sample_id"))
            else:
                x = codec.decode(s.payload, s.length, msg.hidden)
                if not torch.isfinite(x).all():
                    raise ProtocolError(f"NaN or Inf in sample id {s.sample_id}", field=f"samples[{i}].payload")
                rows.append(x)
        if self.receiver is not None:
            for s, x in zip(msg.samples, rows, strict=True):
                if x is not None and not s.reuse:
                    self.receiver.put(s.sample_id, x)
        return rows

    @property
    def cache_bytes(self) -> int:
        return 0 if self.receiver is None else self.receiver.memory_bytes


def stream_ends(temporal, codec: str, grad_codec: str, hidden: int, seed: int, sends: list[Stream],
                receives: list[Stream], cache_dir: str | None = None) -> tuple[dict, dict]:
    """The Outgoing/Incoming ends one side owns, with temporal reuse where the config asks for it."""
    on = set(temporal.streams) if temporal is not None and temporal.enabled else set()
    out = {s: Outgoing(s, codec if s.name.startswith("act") else grad_codec, hidden, reuse=s.name in on,
                       projection_dim=temporal.projection_dim if temporal else 16, seed=seed,
                       max_reuse_streak=temporal.max_reuse_streak if temporal else None,
                       threshold=temporal.threshold if temporal else 1.0,
                       summary_of=temporal.summary_of if temporal else "source") for s in sends}
    inc = {s: Incoming(s, hidden, reuse=s.name in on, store=temporal.store if temporal else "memory",
                       directory=None if cache_dir is None else f"{cache_dir}/{s.name}") for s in receives}
    return out, inc
