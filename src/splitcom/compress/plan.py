"""The stream plan: how each stream one side of a run sends or receives is coded, read from the config once.

Per tensor stream: the codec of what goes whole (FULL), temporal reuse (on or off, threshold, projection,
what the summary is of, streak cap), the refresh of a drifted sample (FULL or a DELTA in its own codec),
where the receiver keeps its copies, prompt-prefix sharing (act_up only: its sender alone knows the
tokens) and the lossless entropy stage. The adapters travel by the same kind of plan (codec, refresh,
delta codec, entropy). The stream ends (compress/pipeline.py), the client and the server (federation/)
take their side's plan; a new per-stream knob is one field in config.py and one in ``StreamPlan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from splitcom.config import Config, stream_value
from splitcom.protocol.messages import Stream

Side = Literal["client", "server"]


@dataclass(frozen=True)
class StreamPlan:
    """One stream's coding; the defaults are a plain fp32 stream."""

    stream: Stream
    codec: str = "fp32"  # FULL payloads
    reuse: bool = False  # temporal reuse: REUSE(id) when the sample's summary has not drifted
    # REUSE when cos(summaries) >= threshold; also the prefix test's (the controller moves it per epoch)
    threshold: float = 1.0
    projection_dim: int = 16  # r of the H x r random projection
    seed: int = 0  # the projection's seed (with the stream's name): both ends can rebuild it
    summary_of: str = "source"  # `source`: the tensor before the codec; `decoded`: what the receiver holds
    summary_norm: str = "none"  # `channel`: channels scaled by their RMS before the projection
    max_reuse_streak: int | None = None  # force a FULL after this many REUSEs in a row
    refresh: str = "full"  # a drifted sample goes `full`, or as a `delta` against the receiver's copy
    delta_codec: str = "int4"  # codec of DELTA payloads (of adapter deltas, for the adapter plan)
    store: str = "memory"  # where the receiver (and the sender's DELTA mirror) keeps tensors
    prefix: bool = False  # shared prompt prefixes (act_up only)
    prefix_refresh: bool = False  # a DELTA refresh shares prompt prefixes too (needs prefix and refresh=delta)
    entropy: str = "none"  # lossless stage after the codec
    skip_reused: bool = False  # grad_down: no gradient for a sample whose activation was REUSEd
    measure_drift: bool = False  # a diagnostic: record the tensors' true drift between sightings (compress/drift.py)
    # bang-bang's byte budget (config: compression.temporal.bangbang.budget): the sender switches sample by
    # sample between the two levels to keep its repeat sightings within this fraction of their FULL bytes
    budget: float | None = None
    levels: tuple[float, float] = (0.99, 0.9999)  # bang-bang's (aggressive, conservative) for this stream


@dataclass(frozen=True)
class SidePlan:
    """Every stream one side sends or receives, and its adapter exchange."""

    side: Side
    sends: dict[Stream, StreamPlan]  # tensor streams this side encodes
    receives: dict[Stream, StreamPlan]  # tensor streams it decodes
    adapters: StreamPlan  # the adapters it uploads (client) or sends down (server)

    @property
    def entropy(self) -> str:
        """The entropy stage of every message this side sends (labels and adapters too)."""
        return self.adapters.entropy

    @property
    def adapter_delta(self) -> str | None:
        """Codec of adapter deltas, or None when adapters always travel whole."""
        return self.adapters.delta_codec if self.adapters.refresh == "delta" else None


def stream_plan(cfg: Config, side: Side) -> SidePlan:
    """The plan of ``side`` in a run of ``cfg``. Streams do not depend on the cut: every cut of a model
    carries tensors of its hidden size, which the stream ends take from the model."""
    c, t = cfg.compression, cfg.compression.temporal
    ushape = cfg.split.mode == "ushape"
    up = [Stream.act_up] + ([Stream.grad_up] if ushape else [])
    down = [Stream.grad_down] + ([Stream.act_down] if ushape else [])
    on = set(t.streams) if t.enabled else set()

    def budget(name: str) -> dict:
        if t.controller != "bangbang" or t.bangbang.budget_of(name) is None or name not in on:
            return {}
        levels = t.bangbang.for_stream(name)
        return {"budget": t.bangbang.budget_of(name), "levels": (levels["aggressive"], levels["conservative"])}

    def plan(s: Stream) -> StreamPlan:
        codec = c.codec if s.name.startswith("act") else c.grad_codec  # a codec, or a map by stream
        return StreamPlan(s, codec=stream_value(codec, s.name, "fp32"), reuse=s.name in on,
                          threshold=t.threshold_of(s.name), projection_dim=t.projection_dim, seed=cfg.train.seed,
                          summary_of=t.summary_of, summary_norm=t.summary_norm, max_reuse_streak=t.max_reuse_streak, refresh=t.refresh,
                          delta_codec=t.delta_codec_of(s.name), store=t.store, prefix=c.prefix and s == Stream.act_up,
                          prefix_refresh=c.prefix_refresh and s == Stream.act_up,
                          entropy=c.entropy, measure_drift=cfg.logging.drift, **budget(s.name),
                          skip_reused=s == Stream.grad_down and t.enabled and t.reused_grad == "skip")

    sends, receives = (up, down) if side == "client" else (down, up)
    adapters = StreamPlan(Stream.adapters_up if side == "client" else Stream.adapters_down, codec=c.adapter_codec,
                          refresh=c.adapter_refresh, delta_codec=c.adapter_delta_codec, entropy=c.entropy)
    return SidePlan(side, {s: plan(s) for s in sends}, {s: plan(s) for s in receives}, adapters)


def state_bytes_per_sample(plan: SidePlan, hidden: int, seq_len: int, dtype_bytes: int = 4) -> int:
    """An upper bound on the stream state one side keeps in memory per training sample of up to ``seq_len``
    tokens (compress/pipeline.py): a sender's summaries (and channel scales), the DELTA mirror of what the
    receiver holds and the registered prompts (rows, summaries, tokens; each as long as the sample at most); a
    receiver's copies and prompt rows. A ``disk`` store keeps mirrors and copies on flash: they do not count.
    ``logging.drift``'s probe (a diagnostic) is not counted. This is what grows with a client's data, where the
    model and its training state do not."""
    tensor = seq_len * hidden * dtype_bytes
    total = 0
    for p in plan.sends.values():
        if p.reuse:
            total += seq_len * p.projection_dim * dtype_bytes + (hidden * dtype_bytes if p.summary_norm == "channel"
                                                                 else 0)
            total += tensor if p.refresh == "delta" and p.store == "memory" else 0
        # a registered prompt: its rows, their summaries and 8 bytes a token (compress/prefix.py)
        total += tensor + seq_len * (min(p.projection_dim, hidden) * dtype_bytes + 8) if p.prefix else 0
    for p in plan.receives.values():
        total += tensor if p.reuse and p.store == "memory" else 0
        total += tensor if p.prefix else 0
    return total
