"""Shared prompt prefixes: samples whose token sequences start alike send those rows once.

Under causal attention the activation of token ``t`` depends on tokens ``[0, t]`` only, so two
samples that share their first ``L`` tokens share their first ``L`` activation rows (E2E has about 8.7
references per meaning representation, and every prompt starts with the same template). The sender
registers each prompt it sends under a key (a hash of its token ids) and the receiver keeps those
rows; a later sample names a registered key and how many rows of it to take (``PrefixRef``), and
sends only its remaining rows.

Within one batch the rows are those of the same forward pass: exact. Across batches the adapters have
moved, so a key is referenced only when the summary test of temporal reuse passes on the shared rows
(``cos(X[:L] @ R, S_key[:L]) >= threshold``); otherwise the sample registers its prompt afresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitcom.compress.temporal import cosine
from splitcom.errors import ProtocolError


def prefix_key(tokens: Sequence[int]) -> int:
    """A non-zero 64-bit key of a token sequence: equal sequences get equal keys; different ones
    collide with probability 2^-64 (0 means "no key" on the wire)."""
    digest = hashlib.blake2b(b",".join(str(int(t)).encode() for t in tokens), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    summary: torch.Tensor  # [P, r] of the source rows, for the cross-batch test
    held: torch.Tensor  # [P, H] what the receiver keeps under this key
    batch: int  # the message it was registered in


class PrefixSender:
    """The sender's view of the receiver's prefix store, mirrored exactly (``held``)."""

    def __init__(self, candidates: int = 4):
        self.entries: dict[int, _Entry] = {}
        self.candidates = candidates  # longest matches whose summary test is tried, best first
        self.batch = 0
        self.rows_shared = 0  # rows not sent thanks to a reference

    def next_message(self) -> None:
        self.batch += 1

    def match(self, tokens: tuple[int, ...], rows: torch.Tensor, threshold: float, summarize) -> tuple[int, int]:
        """(key, L) of the registered prefix to reuse for ``rows`` ([T, H]), or (0, 0)."""
        # longest first; at equal length, one registered in this message (exact, no test) first
        found = sorted(((common_prefix(tokens, e.tokens), e.batch == self.batch, k) for k, e in self.entries.items()),
                       reverse=True)
        for length, _, key in found[: self.candidates]:
            if length == 0:
                break
            e = self.entries[key]
            if e.batch == self.batch:  # same forward pass: exact
                return key, length
            if cosine(summarize(rows[:length]), e.summary[:length]) >= threshold:
                return key, length
        return 0, 0

    def held(self, key: int, length: int) -> torch.Tensor:
        return self.entries[key].held[:length]

    def register(self, tokens: tuple[int, ...], summary: torch.Tensor, held: torch.Tensor) -> int:
        key = prefix_key(tokens)
        self.entries[key] = _Entry(tokens, summary, held.clone(), self.batch)
        return key

    @property
    def memory_bytes(self) -> int:
        return sum(e.summary.numel() * 4 + e.held.numel() * 4 + 8 * len(e.tokens) for e in self.entries.values())

    def state(self) -> dict:
        return {"entries": {k: [list(e.tokens), e.summary, e.held, e.batch] for k, e in self.entries.items()},
                "batch": self.batch, "rows_shared": self.rows_shared}

    def load_state(self, st: dict) -> None:
        self.entries = {int(k): _Entry(tuple(t), s, h, int(b)) for k, (t, s, h, b) in st["entries"].items()}
        self.batch, self.rows_shared = int(st["batch"]), int(st["rows_shared"])


class PrefixStore:
    """The receiver's rows per key. Unknown keys and short entries are protocol errors, never zeros."""

    def __init__(self):
        self.rows: dict[int, torch.Tensor] = {}  # key -> [P, H]

    def get(self, key: int, length: int, field: str, staged: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        held = (staged or {}).get(key, self.rows.get(key))
        if held is None:
            raise ProtocolError(f"PREFIX references key {key:#x}, which was never registered", field=field)
        if held.shape[0] < length:
            raise ProtocolError(f"PREFIX takes {length} rows of key {key:#x}, which holds {held.shape[0]}",
                                field=field)
        return held[:length]

    def update(self, staged: dict[int, torch.Tensor]) -> None:
        self.rows.update(staged)

    def state(self) -> dict:
        return {"rows": dict(self.rows)}

    def load_state(self, st: dict) -> None:
        self.rows = {int(k): v for k, v in st["rows"].items()}

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * 4 for t in self.rows.values())
