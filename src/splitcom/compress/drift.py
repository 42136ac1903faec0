"""How far a stream's tensors really move between a sample's sightings (a diagnostic, ``logging.drift``).

Temporal reuse decides on a random-projection summary; this probe measures the tensor itself. Per sample
it keeps (float16, on the sender, outside the mechanism's own memory) the tensor of the last sighting and
the one last sent (FULL or DELTA), and at each new sighting records:

- ``between``: 1 - cos(X_now, X_previous sighting), the true drift the issue tables report;
- ``between_channel``: the same after scaling each channel by its RMS over the previous tensor's tokens,
  so the few massive channels do not dominate the cosine;
- ``stale``: 1 - cos(X_now, X_last_sent), how far the receiver's copy is from the tensor it stands for;
- ``summary``: 1 - the summary cosine the reuse test used (where reuse is on), to compare with ``stale``.

``take()`` gives median, p90 and mean of each since the last call and starts afresh (once per epoch).
"""

from __future__ import annotations

import torch

from splitcom.compress.temporal import channel_rms, cosine

KINDS = ("between", "between_channel", "stale", "summary")


def one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - cosine(a, b)


class DriftProbe:
    def __init__(self):
        self.seen: dict[int, torch.Tensor] = {}
        self.sent: dict[int, torch.Tensor] = {}
        self.values: dict[str, list[float]] = {k: [] for k in KINDS}

    def sighting(self, sample_id: int, x: torch.Tensor, summary_similarity: float | None = None) -> None:
        x = x.detach().to("cpu", torch.float32)
        prev = self.seen.get(sample_id)
        if prev is not None and prev.shape == x.shape:
            prev = prev.float()
            self.values["between"].append(one_minus_cos(x, prev))
            scale = channel_rms(prev)  # [H]
            self.values["between_channel"].append(one_minus_cos(x / scale, prev / scale))
        held = self.sent.get(sample_id)
        if held is not None and held.shape == x.shape:
            self.values["stale"].append(one_minus_cos(x, held.float()))
        if summary_similarity is not None:
            self.values["summary"].append(1.0 - summary_similarity)
        self.seen[sample_id] = x.half()

    def was_sent(self, sample_id: int, x: torch.Tensor) -> None:
        self.sent[sample_id] = x.detach().to("cpu", torch.float16)

    def take(self) -> dict[str, list[float]]:
        """The values recorded since the last call (which then start afresh)."""
        out, self.values = self.values, {k: [] for k in KINDS}
        return out

    def state(self) -> dict:
        return {"seen": dict(self.seen), "sent": dict(self.sent), "values": {k: list(v) for k, v in self.values.items()}}

    def load_state(self, st: dict | None) -> None:
        """A checkpoint without the probe (drift switched on at a resume) starts it empty."""
        st = st or {}
        self.seen = {int(k): v for k, v in st.get("seen", {}).items()}
        self.sent = {int(k): v for k, v in st.get("sent", {}).items()}
        self.values = {k: list(st.get("values", {}).get(k, [])) for k in KINDS}


def stats(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, p90, mean and count of each kind that has values."""
    out = {}
    for k, v in values.items():
        if v:
            t = torch.tensor(v, dtype=torch.float64)
            out[k] = {"median": float(t.quantile(0.5)), "p90": float(t.quantile(0.9)), "mean": float(t.mean()),
                      "n": len(v)}
    return out
