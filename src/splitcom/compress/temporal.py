"""Temporal reuse (SplitCom): a stream sends a sample's tensor again only when it has drifted.

One mechanism serves every stream (act_up, grad_down, act_down, grad_up): the sender keeps, per
sample id, a summary ``S = X @ R`` of the tensor the receiver holds (``R``: ``H x r`` Gaussian random
projection, scale ``1/sqrt(r)``, rebuilt from the seed and the stream name on any side). For a new
``X`` it compares ``cos(vec(X @ R), vec(S))`` with the threshold: at or above it, it sends REUSE and
the receiver substitutes its stored copy; below it (or at the first sight, or after
``max_reuse_streak`` reuses in a row, or when the length changed) it sends FULL and stores a
summary: by default of the tensor before the codec (``summary_of=source``), because comparing a fresh
tensor with a *decoded* lossy copy counts the codec's own error as drift and, with int4, never reuses
at all; ``summary_of=decoded`` keeps DESIGN 4.3's rule (exactly what the receiver holds).

Memory per sample: sender ``T_i x r`` floats, receiver ``T_i x H`` (in memory, or on disk).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from splitcom.errors import ProtocolError


def projection(hidden: int, dim: int, seed: int, stream: str) -> torch.Tensor:
    """The ``[H, r]`` projection both sides rebuild from (seed, stream)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{hidden}/{dim}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(hidden, dim, generator=g) / dim**0.5


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return 1.0 if a.norm() == b.norm() else 0.0
    return float(a @ b / denom)


def channel_rms(x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [H]
    """Each channel's RMS over the tokens (floored), the scale of ``summary_norm=channel`` and of the drift probe."""
    return x.detach().to("cpu", torch.float32).pow(2).mean(0).sqrt().clamp_min(1e-6)


class TemporalSender:
    def __init__(self, hidden: int, dim: int, seed: int, stream: str, max_reuse_streak: int | None = None,
                 norm: str = "none"):
        """``norm="channel"``: every channel is scaled by its RMS over the reference tensor's tokens before
        the projection (kept per sample), so a few massive channels cannot hide the drift of all others."""
        self.R = projection(hidden, dim, seed, stream)  # [H, r]
        self.max_reuse_streak = max_reuse_streak
        self.norm = norm
        self.summaries: dict[int, torch.Tensor] = {}  # sample id -> [T_i, r]
        self.scales: dict[int, torch.Tensor] = {}  # sample id -> [H] (norm="channel")
        self.streak: dict[int, int] = {}
        self.last_similarity: dict[int, float] = {}

    def summary(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:  # [T, H] -> [T, r]
        x = x.detach().to("cpu", torch.float32)
        return (x if scale is None else x / scale) @ self.R

    def similarity(self, sample_id: int, x: torch.Tensor) -> float | None:
        s = self.summaries.get(sample_id)
        if s is None or s.shape[0] != x.shape[0]:
            return None
        return cosine(self.summary(x, self.scales.get(sample_id)), s)

    def should_reuse(self, sample_id: int, x: torch.Tensor, threshold: float) -> bool:
        sim = self.similarity(sample_id, x)
        if sim is None:
            self.last_similarity.pop(sample_id, None)  # no comparison this time (first sight, new length)
            return False
        self.last_similarity[sample_id] = sim
        if self.max_reuse_streak is not None and self.streak.get(sample_id, 0) >= self.max_reuse_streak:
            return False
        return sim >= threshold

    def clear(self) -> None:
        self.summaries.clear()
        self.scales.clear()
        self.streak.clear()
        self.last_similarity.clear()

    def mark_reused(self, sample_id: int) -> None:
        self.streak[sample_id] = self.streak.get(sample_id, 0) + 1

    def mark_sent(self, sample_id: int, reference: torch.Tensor) -> None:
        """Record the reference the next tensor is compared with (see ``summary_of``)."""
        scale = None
        if self.norm == "channel":
            scale = channel_rms(reference)
            self.scales[sample_id] = scale
        self.summaries[sample_id] = self.summary(reference, scale)
        self.streak[sample_id] = 0

    @property
    def memory_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for d in (self.summaries, self.scales) for s in d.values())

    def state(self) -> dict:
        """Summaries and streaks, for a checkpoint (a resumed run then decides REUSE exactly as before)."""
        return {"summaries": dict(self.summaries), "streak": dict(self.streak),
                "last_similarity": dict(self.last_similarity), "scales": dict(self.scales)}

    def load_state(self, st: dict) -> None:
        self.scales = {int(k): v for k, v in st.get("scales", {}).items()}
        self.summaries = {int(k): v for k, v in st["summaries"].items()}
        self.streak = {int(k): int(v) for k, v in st["streak"].items()}
        self.last_similarity = {int(k): float(v) for k, v in st["last_similarity"].items()}


class TemporalReceiver:
    """The last FULL tensor per sample id; REUSE of an unknown id is a protocol error, never zeros."""

    def __init__(self, store: str = "memory", directory: str | Path | None = None):
        if store not in ("memory", "disk"):
            raise ValueError(f"unknown store {store!r}")
        self.store = store
        self._mem: dict[int, torch.Tensor] = {}
        self._shapes: dict[int, tuple[int, int]] = {}
        self._own_dir = store == "disk" and directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="splitcom-cache-")) if self._own_dir else (
            Path(directory) if directory else None)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, sample_id: int, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", torch.float32).contiguous()
        self._shapes[sample_id] = tuple(x.shape)
        if self.store == "memory":
            self._mem[sample_id] = x
        else:
            np.save(self.dir / f"{sample_id}.npy", x.numpy())

    def get(self, sample_id: int, length: int, field: str = "sample_id", what: str = "REUSE") -> torch.Tensor:
        shape = self._shapes.get(sample_id)
        if shape is None:
            raise ProtocolError(f"{what} for sample id {sample_id}, which was never sent FULL", field=field)
        if shape[0] != length:
            raise ProtocolError(f"{what} for sample id {sample_id} with length {length}, cached length {shape[0]}",
                                field=field)
        if self.store == "memory":
            return self._mem[sample_id]
        return torch.from_numpy(np.load(self.dir / f"{sample_id}.npy"))

    def length(self, sample_id: int) -> int:
        return self._shapes[sample_id][0]

    def __contains__(self, sample_id: int) -> bool:
        return sample_id in self._shapes

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the cache (RAM for `memory`, disk for `disk`)."""
        return sum(int(np.prod(s)) * 4 for s in self._shapes.values())

    def state(self) -> dict:
        """Every held tensor (read back from a disk store too: the files change after the checkpoint)."""
        return {"rows": {sid: self.get(sid, shape[0]) for sid, shape in self._shapes.items()}}

    def load_state(self, st: dict) -> None:
        self.clear()
        for sid, x in st["rows"].items():
            self.put(int(sid), x)

    def clear(self) -> None:
        if self.store == "disk":
            for sid in self._shapes:
                (self.dir / f"{sid}.npy").unlink(missing_ok=True)
        self._mem.clear()
        self._shapes.clear()

    def close(self) -> None:
        if self._own_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
