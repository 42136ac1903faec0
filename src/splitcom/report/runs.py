"""A run directory as the report sees it: its events, summary, eval scores and config, by label.

Everything but ``metrics.jsonl`` is optional (a run that was stopped has no ``summary.json``; most
runs have no ``eval/scores.json``), so each figure or table row shows what exists and a dash
otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from splitcom.errors import UserError

SIM_TIME_KEY = "simulated_s"  # the device/link time model's clock on ``eval`` events (None: centralized)


@dataclass
class RunData:
    path: Path
    label: str
    events: list[dict]
    summary: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # flattened: {"train.lr": 0.003, ...}
    audit: dict = field(default_factory=dict)  # audit.json of `splitcom audit` (what the server reconstructs)

    def of(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    @property
    def evals(self) -> list[dict]:
        """``eval`` events in epoch order (epoch 0 is the check before training)."""
        return sorted(self.of("eval"), key=lambda e: e.get("epoch", 0))

    @property
    def reuse_enabled(self) -> bool:
        return bool(self.config.get("compression.temporal.enabled", False))

    def sim_times(self) -> list[tuple[int, float]]:
        """(epoch, simulated seconds so far) for eval events that carry a simulated clock."""
        return [(int(e.get("epoch", 0)), float(e[SIM_TIME_KEY])) for e in self.evals
                if isinstance(e.get(SIM_TIME_KEY), int | float)]


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"not valid JSON ({err})", where=str(path)) from None
    return data if isinstance(data, dict) else {}


def _read_events(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    events = []
    for i, (lineno, line) in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # only the last line of a run still writing (or killed) may be cut short
                raise UserError("not a JSON line", where=f"{path}:{lineno}") from None
    return events


def labels_for(paths: list[Path]) -> list[str]:
    """Directory names; where two runs share one, add parent folders until the labels differ."""
    parts = [p.resolve().parts for p in paths]
    depth = 1
    while True:
        labels = ["/".join(pp[-depth:]) for pp in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(pp) for pp in parts):
            return labels
        depth += 1


def load_run(path: str | Path, label: str | None = None) -> RunData:
    p = Path(path)
    if not p.is_dir():
        raise UserError("run directory not found", where=str(p))
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError("not a run directory (no metrics.jsonl)", where=str(p))
    config: dict = {}
    if (p / "config.yaml").is_file():
        try:
            config = flatten(yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {})
        except yaml.YAMLError:
            raise UserError("config.yaml is not valid YAML", where=str(p / "config.yaml")) from None
    return RunData(p, label or p.resolve().name, _read_events(metrics), _read_json(p / "summary.json"),
                   _read_json(p / "eval" / "scores.json"), config, _read_json(p / "audit.json"))


def load_runs(paths: list[str | Path]) -> list[RunData]:
    if not paths:
        raise UserError("name at least one run directory", where="OUT")
    ps = [Path(p) for p in paths]
    if len({p.resolve() for p in ps}) != len(ps):
        raise UserError("the same run directory is named twice", where="OUT")
    return [load_run(p, label) for p, label in zip(ps, labels_for(ps), strict=True)]
