"""What the server receives on act_up: the client's head on some samples, through the run's own stream.

The audit must attack the tensors a server really holds, not the floats before the wire: the client's
noise (``privacy``), codec, temporal reuse and prompt prefixes all change them. So capture builds the
client's act_up ``Outgoing`` and the server's ``Incoming`` from the run's stream plan with the same factory
the run uses (``stream_plan``, ``stream_ends``), sends every batch through serde bytes, and keeps the rows the server's
receiving end decodes. With temporal reuse on, the samples go through ``passes`` times and the rows are
what the server holds after the last pass (a REUSE hands it its cached copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitcom.compress.noise import act_noise
from splitcom.compress.pipeline import stream_ends
from splitcom.compress.plan import stream_plan
from splitcom.data.tokenize import Sample, collate
from splitcom.federation.client import prompt_length
from splitcom.models.split import SplitModel, pad, unpad
from splitcom.protocol import serde
from splitcom.protocol.messages import Stream


@dataclass
class Captured:
    samples: list[Sample]
    rows: list[torch.Tensor]  # per sample [T_i, H]: what the server decoded
    bytes: int  # serialized act_up bytes of the last pass

    @property
    def lengths(self) -> list[int]:
        return [len(s.ids) for s in self.samples]


def act_up_ends(cfg, hidden: int, client_id: int = 0):
    """The client's act_up sender, the server's act_up receiver and the client's noise, as the run builds them."""
    out, _ = stream_ends(stream_plan(cfg, "client"), hidden)
    _, inc = stream_ends(stream_plan(cfg, "server"), hidden)
    return out[Stream.act_up], inc[Stream.act_up], act_noise(cfg.privacy, cfg.train.seed, client_id)


def reuse_on(cfg) -> bool:
    t = cfg.compression.temporal
    return bool(t.enabled and "act_up" in t.streams)


def capture_act_up(cfg, split: SplitModel, samples: list[Sample], cut: int, pad_id: int, *, passes: int | None = None,
                   batch_size: int | None = None, client_id: int = 0) -> Captured:
    """Run the client head (the adapter active in ``split``) and send every batch through serde to the
    server's act_up end; return what that end decoded. Fresh ends per call: nothing cached before."""
    out, inc, noise = act_up_ends(cfg, split.hidden_size, client_id)
    passes = passes if passes is not None else (2 if reuse_on(cfg) else 1)
    bs = batch_size or cfg.train.batch_size
    held: dict[int, torch.Tensor] = {}
    nbytes = 0
    for p in range(passes):
        nbytes = 0
        for start in range(0, len(samples), bs):
            batch = collate(samples[start : start + bs], pad_id)
            with torch.no_grad():
                h = split.head(batch.input_ids, batch.lengths, cut)  # [B, T, H]
            rows = unpad(h, batch.lengths)
            if noise is not None:
                rows = noise(rows)
            prompts = [tuple(batch.input_ids[i, : prompt_length(batch.labels[i])].tolist())
                       for i in range(len(rows))] if cfg.compression.prefix else None
            data = serde.encode(out.message(client_id, p * len(samples) + start, batch.sample_ids, rows,
                                            tokens=prompts))
            nbytes += len(data)
            received = inc.decode(serde.decode(data))
            held.update(zip(batch.sample_ids, received, strict=True))
    return Captured(list(samples), [held[s.sample_id] for s in samples], nbytes)


def server_body(split: SplitModel, cap: Captured, start: int, end: int, batch_size: int = 16) -> list[torch.Tensor]:
    """U-shape: blocks [start, end) on the received rows, as the server computes act_down (before its codec:
    the server knows its own floats)."""
    outs: list[torch.Tensor] = []
    for i in range(0, len(cap.rows), batch_size):
        rows, lengths = cap.rows[i : i + batch_size], cap.lengths[i : i + batch_size]
        with torch.no_grad():
            outs += unpad(split.run(pad(rows), lengths, start, end), lengths)
    return outs
