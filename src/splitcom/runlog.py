"""Run outputs: ``metrics.jsonl`` (one JSON event per line, flushed as written) and ``summary.json``."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path


class RunLog:
    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self._fh = path.open("a" if append else "w", encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        self._fh.write(json.dumps({"event": event, **fields}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def write_json(path: Path, data: dict) -> None:
    """Write atomically so a crash never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def read_metrics(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
