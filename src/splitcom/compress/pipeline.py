"""One stream end: codec + optional temporal reuse, the same object for all four tensor streams.

``Outgoing`` turns per-sample ``[T_i, H]`` rows into FULL/REUSE ``SampleTensor`` records;
``Incoming`` turns a received ``TensorMsg`` back into rows, substituting cached tensors for REUSE.
Each side of each stream owns one (the client sends act_up and, in U-shape, grad_up; the server
sends grad_down and, in U-shape, act_down), built from that stream's plan (compress/plan.py).
"""

from __future__ import annotations

import torch

from splitcom.compress.codecs import get_codec
from splitcom.compress.drift import DriftProbe
from splitcom.compress.plan import SidePlan, StreamPlan
from splitcom.compress.prefix import PrefixSender, PrefixStore
from splitcom.compress.temporal import TemporalReceiver, TemporalSender, projection
from splitcom.errors import ProtocolError
from splitcom.protocol import serde
from splitcom.protocol.messages import PrefixRef, SampleTensor, Stream, TensorMsg

TRANSFER_KEYS = ("full", "reuse", "delta", "delta_bytes", "prefix_rows_shared", "prefix_bytes_saved", "cache_bytes")
PREFIX_BYTES = serde.PREFIX.size  # ref_key u64 | ref_len u32 | own_key u64 | own_len u32


class Outgoing:
    """One sending end. Per sample, in order: REUSE when the summary test passes; else DELTA against the
    receiver's copy (``refresh=delta``, same length; with ``prefix_refresh``, of the rows after a shared
    prompt prefix only); else FULL, with the rows after a shared prompt prefix only (``prefix``). It
    mirrors what the receiver holds (``held``) wherever a later decision needs it: the sample's tensor
    for DELTA, a key's rows for PREFIX, the summary for ``decoded``."""

    def __init__(self, stream: Stream, codec: str, hidden: int, *, directory: str | None = None, **knobs):
        """``knobs``: the other fields of a ``StreamPlan``; ``directory``: where a disk ``store`` keeps the
        mirror of DELTA refreshes."""
        self.plan = p = StreamPlan(stream, codec, **knobs)
        self.stream, self.codec, self.hidden = stream, get_codec(codec), hidden
        self.sender = TemporalSender(hidden, p.projection_dim, p.seed, stream.name, p.max_reuse_streak,
                                     p.summary_norm) if p.reuse else None
        self.threshold = p.threshold
        # `source`: summarise the tensor before the codec, so a lossy codec's own error is not taken for
        # drift (it is there whether or not we resend); `decoded`: summarise what the receiver holds.
        self.summary_of = p.summary_of
        self.delta_codec = get_codec(p.delta_codec)
        # the receiver's copy of every sample, kept exactly (needed only to code residuals against it)
        self.mirror = TemporalReceiver(p.store, directory) if p.reuse and p.refresh == "delta" else None
        self.prefix = PrefixSender() if p.prefix else None
        # the prefix test's projection: the reuse sender's, or (prefix sharing without reuse) its own
        self._R = self.sender.R if self.sender is not None else \
            projection(hidden, min(p.projection_dim, hidden), p.seed, stream.name) if p.prefix else None
        self.entropy = p.entropy
        self.drift = DriftProbe() if p.measure_drift else None  # a diagnostic, not part of the mechanism
        # bang-bang's byte budget: what this end's repeat sightings cost so far, and would have cost FULL
        self.budget, self.levels = p.budget, p.levels
        self.repeat_bytes = self.repeat_full_bytes = 0
        self.sent_full = self.sent_reuse = self.sent_delta = 0
        self.bytes_saved = 0  # payload bytes not sent thanks to REUSE, DELTA and shared prefixes
        self.delta_bytes = self.prefix_bytes_saved = 0

    @classmethod
    def of(cls, plan: StreamPlan, hidden: int, directory: str | None = None) -> Outgoing:
        return cls(hidden=hidden, directory=directory, **vars(plan))

    def _summarize(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, r]
        return x.detach().to("cpu", torch.float32) @ self._R

    def _sent(self, sample_id: int, row: torch.Tensor, held) -> None:
        """Bookkeeping after a FULL/DELTA: ``held()`` is the tensor the receiver now keeps."""
        if self.sender is not None:
            self.sender.mark_sent(sample_id, row if self.summary_of == "source" else held())
        if self.mirror is not None:
            self.mirror.put(sample_id, held())
        if self.drift is not None:
            self.drift.was_sent(sample_id, row)

    def _level(self) -> float:
        """The threshold of the next sample. With a byte budget, while the controller allows its aggressive
        level: aggressive while the repeat sightings so far cost more than the budget, else conservative."""
        aggressive, conservative = self.levels
        if self.budget is None or self.threshold >= conservative:
            return self.threshold  # no budget, or val loss got worse: the controller's level for the epoch
        return aggressive if self.repeat_bytes > self.budget * self.repeat_full_bytes else conservative

    def encode(self, sample_id: int, row: torch.Tensor, tokens: tuple[int, ...] | None = None) -> SampleTensor:
        repeat = self.budget is not None and sample_id in self.sender.summaries
        sent = self._encode(sample_id, row, tokens)
        if repeat:
            self.repeat_full_bytes += self.codec.nbytes(row.shape[0], self.hidden)
            self.repeat_bytes += 0 if sent.payload is None else len(sent.payload)
        return sent

    def _encode(self, sample_id: int, row: torch.Tensor, tokens: tuple[int, ...] | None) -> SampleTensor:
        n, h = row.shape[0], self.hidden  # row: [T_i, H]
        reuse = self.sender is not None and self.sender.should_reuse(sample_id, row, self._level())
        if self.drift is not None:
            # the summary cosine should_reuse just computed (None where it compared nothing)
            self.drift.sighting(sample_id, row, self.sender.last_similarity.get(sample_id) if self.sender else None)
        if reuse:
            self.sender.mark_reused(sample_id)
            self.sent_reuse += 1
            self.bytes_saved += self.codec.nbytes(n, h)
            return SampleTensor(sample_id, n, None)
        self.sent_full += 1
        if self.mirror is not None and sample_id in self.mirror and self.mirror.length(sample_id) == n:
            held = self.mirror.get(sample_id, n)
            if self.prefix is not None and self.plan.prefix_refresh and tokens is not None:
                return self._prefix_delta(sample_id, row, tuple(tokens[:n]), held)
            payload = self.delta_codec.encode(row.detach().to("cpu", torch.float32) - held)
            new = held + self.delta_codec.decode(payload, n, h)  # exactly the receiver's sum
            self._sent(sample_id, row, lambda: new)
            self.sent_delta += 1
            self.delta_bytes += len(payload)
            self.bytes_saved += self.codec.nbytes(n, h) - len(payload)
            return SampleTensor(sample_id, n, payload, delta=True)
        if self.prefix is None or tokens is None:
            payload = self.codec.encode(row)
            self._sent(sample_id, row, lambda: self.codec.decode(payload, n, h))
            return SampleTensor(sample_id, n, payload)
        tokens = tuple(tokens[:n])

        def first_sight(length: int) -> tuple[bytes, torch.Tensor]:
            payload = self.codec.encode(row[length:])
            return payload, self.codec.decode(payload, n - length, h)

        payload, held, ref = self._prefixed(row, tokens, first_sight)
        saved = self.codec.nbytes(n, h) - self.codec.nbytes(n - ref.ref_len, h) - PREFIX_BYTES
        self.prefix_bytes_saved += saved
        self.bytes_saved += saved
        self._sent(sample_id, row, lambda: held)
        return SampleTensor(sample_id, n, payload, prefix=ref)

    def _prefixed(self, row: torch.Tensor, tokens: tuple[int, ...], code) -> tuple[bytes, torch.Tensor, PrefixRef]:
        """The rows after the longest registered prompt prefix that passes the summary test, coded by
        ``code(length) -> (payload, the receiver's rows after the prefix)``; a prompt not all covered is
        registered with the rows the receiver rebuilds. Returns the payload, those rebuilt rows ([T, H]) and
        the reference."""
        key, length = self.prefix.match(tokens, row, self.threshold, self._summarize)
        payload, rest = code(length)
        held = torch.cat([self.prefix.held(key, length), rest]) if length else rest
        own_key = own_len = 0
        if tokens and not (key and length == len(tokens)):  # the prompt is not all covered: register it
            own_len = len(tokens)
            own_key = self.prefix.register(tokens, self._summarize(row[:own_len]), held[:own_len])
        self.prefix.rows_shared += length
        return payload, held, PrefixRef(key, length, own_key, own_len)

    def _prefix_delta(self, sample_id: int, row: torch.Tensor, tokens: tuple[int, ...],
                      held: torch.Tensor) -> SampleTensor:
        """A DELTA refresh that shares prompt prefixes as a first sight does (``prefix_refresh``): the prompt
        rows come from a registered prefix that passes the summary test (one refreshed earlier in this
        message: exact), the payload codes the change of the remaining rows only, and a prompt not covered
        is registered with its refreshed rows for the samples after it. Without it every refresh of a
        sample whose reference shares its meaning representation with 8 others resends the same prompt."""
        n, h = row.shape[0], self.hidden

        def change(length: int) -> tuple[bytes, torch.Tensor]:
            payload = self.delta_codec.encode(row[length:].detach().to("cpu", torch.float32) - held[length:])
            return payload, held[length:] + self.delta_codec.decode(payload, n - length, h)  # the receiver's sum

        payload, new, ref = self._prefixed(row, tokens, change)
        self.prefix_bytes_saved += self.delta_codec.nbytes(n, h) - len(payload) - PREFIX_BYTES
        self._sent(sample_id, row, lambda: new)
        self.sent_delta += 1
        self.delta_bytes += len(payload) + PREFIX_BYTES
        self.bytes_saved += self.codec.nbytes(n, h) - len(payload) - PREFIX_BYTES
        return SampleTensor(sample_id, n, payload, delta=True, prefix=ref)

    def message(self, client_id: int, step: int, sample_ids, rows, scalar: float = 0.0,
                skip: set[int] | None = None, tokens: list[tuple[int, ...]] | None = None) -> TensorMsg:
        """``tokens``: each sample's prompt token ids, for prefix sharing (ignored without it)."""
        skip = skip or set()
        if self.prefix is not None:
            self.prefix.next_message()
        tokens = tokens if tokens is not None else [None] * len(rows)
        samples = [SampleTensor(sid, r.shape[0], None, skip=True) if sid in skip else self.encode(sid, r, t)
                   for sid, r, t in zip(sample_ids, rows, tokens, strict=True)]
        return TensorMsg(self.stream, client_id, step, self.codec.name, self.hidden, samples, scalar,
                         self.delta_codec.name, self.entropy)

    def forget(self) -> None:
        """Drop everything assumed about the receiver (after a rejoin it may hold none of it): every
        sample and prompt goes FULL once more."""
        if self.sender is not None:
            self.sender.clear()
        if self.mirror is not None:
            self.mirror.clear()
        if self.prefix is not None:
            self.prefix.entries.clear()

    @property
    def caches(self) -> bool:
        """Whether this end keeps anything a checkpoint must carry."""
        return any(x is not None for x in (self.sender, self.mirror, self.prefix, self.drift))

    @property
    def remembers(self) -> bool:
        """Whether it keeps what the receiver holds (summaries, mirror, prefixes): a resume needs it exactly."""
        return any(x is not None for x in (self.sender, self.mirror, self.prefix))

    def cache_state(self) -> dict:
        """What this end remembers of the receiver (summaries, the DELTA mirror, prefixes), for a checkpoint;
        and the drift probe's tensors, so a resumed run measures drift across the interruption."""
        return {**{k: None if x is None else x.state() for k, x in
                    (("sender", self.sender), ("mirror", self.mirror), ("prefix", self.prefix),
                     ("drift", self.drift))},
                "budget": [self.repeat_bytes, self.repeat_full_bytes]}

    def load_cache_state(self, st: dict) -> None:
        for k, x in (("sender", self.sender), ("mirror", self.mirror), ("prefix", self.prefix)):
            if x is not None:
                x.load_state(st[k])
        if self.budget is not None and "budget" not in st:
            raise KeyError("budget")  # load_cache_state names the stream end and the checkpoint
        self.repeat_bytes, self.repeat_full_bytes = st.get("budget", [0, 0])
        if self.drift is not None:
            self.drift.load_state(st.get("drift"))

    @property
    def cache_bytes(self) -> int:
        """Sender memory: summaries, the mirror of the receiver's tensors (DELTA) and of its prefixes."""
        return sum(0 if x is None else x.memory_bytes for x in (self.sender, self.mirror, self.prefix))

    @property
    def reuse_ratio(self) -> float:
        return self.sent_reuse / max(self.sent_full + self.sent_reuse, 1)

    def counts(self) -> dict[str, int]:
        """TRANSFER_KEYS: samples sent FULL, REUSE, DELTA; DELTA bytes; prefix rows shared and bytes saved;
        the sender's cache bytes."""
        return {"full": self.sent_full - self.sent_delta, "reuse": self.sent_reuse, "delta": self.sent_delta,
                "delta_bytes": self.delta_bytes, "prefix_rows_shared": self.prefix.rows_shared if self.prefix else 0,
                "prefix_bytes_saved": self.prefix_bytes_saved, "cache_bytes": self.cache_bytes}


def add_counts(*parts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Sum counters by stream (``counts()`` of several ends, or of several sides' ends), streams sorted."""
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for stream, counts in part.items():
            acc = out.setdefault(stream, {})
            for k, v in counts.items():
                acc[k] = acc.get(k, 0) + v
    return dict(sorted(out.items()))


_COUNTS = ("sent_full", "sent_reuse", "bytes_saved", "sent_delta", "delta_bytes", "prefix_bytes_saved",
           "repeat_bytes", "repeat_full_bytes")  # the last two: bang-bang's byte budget so far


def end_counts(ends: dict) -> dict[str, list[int]]:
    """The counters of some outgoing stream ends (for a checkpoint)."""
    return {s.name: [getattr(e, k) for k in _COUNTS] for s, e in ends.items() if isinstance(e, Outgoing)}


def set_end_counts(ends: dict, counts: dict[str, list[int]]) -> None:
    for s, e in ends.items():
        if s.name in counts:
            for k, v in zip(_COUNTS, counts[s.name], strict=False):  # older checkpoints hold the first three
                setattr(e, k, v)


class Incoming:
    """One receiving end: the codecs come with each message; the plan says whether REUSE and DELTA
    (``reuse``, with the copies in ``store``) and shared prefixes may arrive."""

    def __init__(self, stream: Stream, hidden: int, *, directory: str | None = None, **knobs):
        self.plan = p = StreamPlan(stream, **knobs)
        self.stream, self.hidden = stream, hidden
        self.receiver = TemporalReceiver(p.store, directory) if p.reuse else None
        self.prefixes = PrefixStore() if p.prefix else None

    @classmethod
    def of(cls, plan: StreamPlan, hidden: int, directory: str | None = None) -> Incoming:
        return cls(hidden=hidden, directory=directory, **vars(plan))

    def decode(self, msg: TensorMsg, sample_ids: list[int] | None = None) -> list[torch.Tensor | None]:
        """Rows of a message (None for SKIP); validates everything before any cache changes."""
        if msg.stream != self.stream:
            raise ProtocolError(f"expected {self.stream.name}, got {msg.stream.name}", field="stream")
        if msg.hidden != self.hidden:
            raise ProtocolError(f"hidden {msg.hidden} != model hidden {self.hidden}", field="hidden")
        if sample_ids is not None and [s.sample_id for s in msg.samples] != list(sample_ids):
            raise ProtocolError("sample ids do not match the request", field="samples")
        codec, delta_codec, rows = get_codec(msg.codec), get_codec(msg.delta_codec), []
        staged: dict[int, torch.Tensor] = {}  # prefixes registered by this message
        for i, s in enumerate(msg.samples):
            where = f"samples[{i}]"
            if s.skip:
                rows.append(None)
                continue
            if (s.reuse or s.delta) and self.receiver is None:
                raise ProtocolError(f"{'REUSE' if s.reuse else 'DELTA'} for sample id {s.sample_id}, but temporal "
                                    f"reuse is off on {self.stream.name}", field=where)
            if s.reuse:
                rows.append(self.receiver.get(s.sample_id, s.length, field=f"{where}.sample_id"))
                continue
            if s.prefix is not None and self.prefixes is None:
                raise ProtocolError(f"PREFIX for sample id {s.sample_id}, but prefix sharing is off on "
                                    f"{self.stream.name}", field=where)
            if s.delta:
                held = self.receiver.get(s.sample_id, s.length, field=f"{where}.sample_id", what="DELTA")
                if s.prefix is None:
                    x = held + delta_codec.decode(s.payload, s.length, msg.hidden)
                else:  # the prompt rows from a shared prefix, the change of the rest (prefix_refresh)
                    p = s.prefix
                    rest = held[p.ref_len:] + delta_codec.decode(s.payload, s.length - p.ref_len, msg.hidden)
                    x = torch.cat([self.prefixes.get(p.ref_key, p.ref_len, f"{where}.prefix.ref_key", staged),
                                   rest]) if p.ref_len else rest
                    if p.own_key:
                        staged[p.own_key] = x[: p.own_len].clone()
            elif s.prefix is not None:
                p = s.prefix
                rest = codec.decode(s.payload, s.length - p.ref_len, msg.hidden)
                x = torch.cat([self.prefixes.get(p.ref_key, p.ref_len, f"{where}.prefix.ref_key", staged), rest]) \
                    if p.ref_len else rest
                if p.own_key:
                    staged[p.own_key] = x[: p.own_len].clone()
            else:
                x = codec.decode(s.payload, s.length, msg.hidden)
            if not torch.isfinite(x).all():
                raise ProtocolError(f"NaN or Inf in sample id {s.sample_id}", field=f"{where}.payload")
            rows.append(x)
        if self.prefixes is not None:
            self.prefixes.update(staged)
        if self.receiver is not None:
            for s, x in zip(msg.samples, rows, strict=True):
                if x is not None and not s.reuse:
                    self.receiver.put(s.sample_id, x)
        return rows

    @property
    def cache_bytes(self) -> int:
        return sum(0 if x is None else x.memory_bytes for x in (self.receiver, self.prefixes))

    @property
    def caches(self) -> bool:
        return self.receiver is not None or self.prefixes is not None

    @property
    def remembers(self) -> bool:
        """Whether a resume needs its caches exactly (a receiver keeps nothing diagnostic)."""
        return self.caches

    def cache_state(self) -> dict:
        """The held tensors and prefix rows, for a checkpoint."""
        return {k: None if x is None else x.state() for k, x in (("receiver", self.receiver),
                                                                   ("prefixes", self.prefixes))}

    def load_cache_state(self, st: dict) -> None:
        for k, x in (("receiver", self.receiver), ("prefixes", self.prefixes)):
            if x is not None:
                x.load_state(st[k])


def cache_state(out: dict, inc: dict) -> dict[str, dict]:
    """Both kinds of ends' caches by stream name ("<stream>/out", "<stream>/in")."""
    return {**{f"{s.name}/out": e.cache_state() for s, e in out.items()},
            **{f"{s.name}/in": e.cache_state() for s, e in inc.items()}}


def load_cache_state(out: dict, inc: dict, st: dict[str, dict], where: str) -> None:
    """Restore ``cache_state``; a stream end the checkpoint does not cover is a UserError naming ``where``."""
    from splitcom.errors import UserError

    for suffix, ends in (("out", out), ("in", inc)):
        for s, e in ends.items():
            key = f"{s.name}/{suffix}"
            if not e.caches:
                continue  # nothing cached on this end (no reuse, DELTA or prefixes)
            if key not in st and not e.remembers:
                continue  # only logging.drift's probe (a diagnostic, newly on): it measures from here on
            if key not in st:
                raise UserError(f"has no caches of the {key} stream end that this config uses (written by an "
                                "older splitcom or another config): it cannot be resumed exactly", where=where)
            try:
                e.load_cache_state(st[key])
            except KeyError as missing:
                raise UserError(f"the caches of the {key} stream end lack {missing} (written by an older splitcom "
                                "or another config): it cannot be resumed exactly", where=where) from None


def stream_ends(plan: SidePlan, hidden: int, cache_dir: str | None = None) -> tuple[dict, dict]:
    """The Outgoing/Incoming ends of one side (``cache_dir``: where disk stores go, a folder per stream)."""
    where = lambda s, suffix="": None if cache_dir is None else f"{cache_dir}/{s.name}{suffix}"  # noqa: E731
    out = {s: Outgoing.of(p, hidden, where(s, "-mirror")) for s, p in plan.sends.items()}
    inc = {s: Incoming.of(p, hidden, where(s)) for s, p in plan.receives.items()}
    return out, inc
