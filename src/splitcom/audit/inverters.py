"""The learning-based attack: a small network from one hidden state at the cut to the token at its position.

The server trains it on public text it owns (another dataset than the client's), which it pushes through
the client's head itself: it knows the pretrained weights and the client adapters it aggregates, and the
run's noise and codec, so its training features come through the same stream as the client's (BiSR's
learning-based attack, arXiv 2409.00960, with a per-position MLP instead of a transformer).

Two output layers. ``classes``: a softmax over the token ids the public text uses, so a token the public
text never shows cannot be named (``coverage`` says how many of the true tokens could be). ``embedding``
(default): the MLP maps into the model's input-embedding space and scores tokens by cosine against the
embedding table, trained on the public tokens but predicting over the whole vocabulary, so the E2E
restaurant names that WebNLG never contains can still come out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class InverterStats:
    classes: int  # token ids the inverter can name
    train_tokens: int
    held_out_acc: float  # accuracy on 10 % of the public tokens, held out (the attacker's own estimate)
    epochs: int
    seconds: float


class LearnedInverter:
    def __init__(self, hidden: int, width: int = 512, seed: int = 0, table: torch.Tensor | None = None):
        """``table``: the [V, H_e] input embeddings for the ``embedding`` output; None: the ``classes`` output."""
        self.hidden, self.width, self.seed = hidden, width, seed
        self.table = None if table is None else nn.functional.normalize(table.detach().float(), dim=-1)
        self.net: nn.Module | None = None
        self.classes = torch.empty(0, dtype=torch.long)  # class index -> token id
        self.scale = torch.tensor(20.0)  # cosine logits' temperature (learned with the embedding output)

    def _logits(self, x: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
        y = self.net(x)
        if self.table is None:
            return y
        table = self.table if classes is None else self.table[classes]
        return self.scale * nn.functional.normalize(y, dim=-1) @ table.T

    def fit(self, feats: torch.Tensor, tokens: torch.Tensor, *, epochs: int = 6, lr: float = 2e-3,
            batch_size: int = 512, time_budget_s: float | None = None) -> InverterStats:
        """``feats`` [N, H] hidden states, ``tokens`` [N] the token id at each."""
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(self.seed)
        self.classes, target = torch.unique(tokens, return_inverse=True)
        torch.manual_seed(self.seed)
        out = len(self.classes) if self.table is None else self.table.shape[1]
        self.net = nn.Sequential(nn.LayerNorm(self.hidden), nn.Linear(self.hidden, self.width), nn.GELU(),
                                 nn.Linear(self.width, out))
        self.scale = nn.Parameter(torch.tensor(20.0))
        perm = torch.randperm(len(tokens), generator=g)
        n_val = max(1, len(tokens) // 10)
        val, train = perm[:n_val], perm[n_val:]
        opt = torch.optim.Adam([*self.net.parameters(), self.scale], lr=lr)
        done = 0
        for _ in range(epochs):
            order = train[torch.randperm(len(train), generator=g)]
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                loss = nn.functional.cross_entropy(self._logits(feats[idx], self.classes), target[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            done += 1
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
        with torch.no_grad():
            acc = float((self._logits(feats[val], self.classes).argmax(-1) == target[val]).float().mean())
        return InverterStats(len(self.classes), len(train), acc, done, time.perf_counter() - t0)

    def predict(self, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per sample [T_i, H] -> [T_i] token ids."""
        assert self.net is not None, "fit first"
        with torch.no_grad():
            if self.table is None:
                return [self.classes[self._logits(r.float(), None).argmax(-1)] for r in rows]
            return [self._logits(r.float(), None).argmax(-1) for r in rows]

    def coverage(self, tokens: torch.Tensor) -> float:
        """Fraction of these token ids that are among the public tokens it was trained on."""
        return float(torch.isin(tokens, self.classes).float().mean()) if len(tokens) else 0.0


def features(rows: list[torch.Tensor], samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample rows with the token at each position: ([N, H], [N])."""
    x = torch.cat([r.float() for r in rows])
    y = torch.cat([torch.tensor(s.ids[: r.shape[0]], dtype=torch.long) for r, s in zip(rows, samples, strict=True)])
    return x, y
