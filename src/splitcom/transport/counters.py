"""Exact byte counters per stream and direction: the bytes of the serialized messages."""

from __future__ import annotations

import threading
from collections import defaultdict

from splitcom.protocol.messages import Stream


class ByteCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_stream_dir: dict[tuple[str, str], int] = defaultdict(int)
        self.messages: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, stream: Stream, direction: str, nbytes: int) -> None:
        with self._lock:
            self.by_stream_dir[(stream.name, direction)] += nbytes
            self.messages[(stream.name, direction)] += 1

    @property
    def up(self) -> int:
        return sum(v for (_, d), v in self.by_stream_dir.items() if d == "up")

    @property
    def down(self) -> int:
        return sum(v for (_, d), v in self.by_stream_dir.items() if d == "down")

    def by_stream(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (s, _), v in self.by_stream_dir.items():
            out[s] += v
        return dict(sorted(out.items()))

    def state_dict(self) -> list[list]:
        return [[s, d, n, self.messages[(s, d)]] for (s, d), n in self.by_stream_dir.items()]

    def load_state_dict(self, rows: list[list]) -> None:
        for s, d, n, m in rows:
            self.by_stream_dir[(s, d)], self.messages[(s, d)] = n, m

    def snapshot(self) -> dict:
        return {"bytes_up": self.up, "bytes_down": self.down, "bytes_by_stream": self.by_stream()}
