"""Per-epoch bookkeeping of temporal reuse and the threshold controller that sets the next epoch's
threshold (compress/control/). Kept out of the rounds loop so the loop stays readable."""

from __future__ import annotations

from pathlib import Path

from splitcom.compress.control import IntervalStats, make_controller
from splitcom.compress.drift import KINDS, stats
from splitcom.compress.pipeline import add_counts
from splitcom.config import TemporalCfg
from splitcom.errors import UserError


class ReuseControl:
    """One controller per temporal stream (``compression.temporal.streams``), each with its own threshold
    (``threshold`` may be a map by stream; so may bang-bang's levels), stepping once per epoch on that
    stream's own reuse ratio and bytes and the shared validation loss."""

    def __init__(self, cfg: TemporalCfg, clients: list, hidden: int, epochs: int, seed: int, server=None):
        if cfg.enabled and cfg.projection_dim > hidden:
            raise UserError(f"must be <= the hidden size {hidden} (got {cfg.projection_dim})",
                            where="compression.temporal.projection_dim")
        self.cfg, self.clients, self.epochs, self.server = cfg, clients, epochs, server
        self.streams = list(dict.fromkeys(cfg.streams)) if cfg.enabled else []
        self.controllers = {}
        for i, stream in enumerate(self.streams):
            options = {"fixed": {"threshold": cfg.threshold_of(stream)}, "bangbang": cfg.bangbang.for_stream(stream),
                       "ddpg": self._ddpg_options(stream)}[cfg.controller]
            self.controllers[stream] = make_controller(cfg.controller, options, seed=seed + i)
        self.thresholds = {s: c.initial() for s, c in self.controllers.items()}
        self.by_epoch: list[dict] = []
        self._marks: dict[str, list[int]] = {}

    def _ddpg_options(self, stream: str) -> dict:
        options = self.cfg.ddpg.model_dump()
        if options["load"] and len(self.streams) > 1:  # one agent per stream: <stem>-<stream>.zip
            options["load"] = str(agent_path(Path(options["load"]), stream, self.streams))
        return options

    @property
    def threshold(self) -> float:
        """The act_up threshold (or the first temporal stream's): what one-number views show."""
        if not self.thresholds:
            return 1.0
        return self.thresholds.get("act_up", next(iter(self.thresholds.values())))

    def _counts(self, stream: str) -> list[int]:
        """(FULL, REUSE, bytes saved) so far on ``stream``, whichever side sends it."""
        if stream == "act_up":  # deployment's client stats expose act_up only, under these names
            return [sum(c.sent_full for c in self.clients), sum(c.sent_reuse for c in self.clients),
                    sum(c.bytes_saved for c in self.clients)]
        ends = [e for name, e in self._ends() if name == stream]
        return [sum(e.sent_full for e in ends), sum(e.sent_reuse for e in ends), sum(e.bytes_saved for e in ends)]

    def begin_epoch(self, bytes_by_stream: dict[str, int]) -> None:
        for c in self.clients:
            c.threshold = dict(self.thresholds)
        if self.server is not None:  # the server sends grad_down (and act_down in U-shape)
            self.server.set_threshold(dict(self.thresholds))
        self._marks = {s: [*self._counts(s), bytes_by_stream.get(s, 0)] for s in self.streams or ["act_up"]}

    def end_epoch(self, epoch: int, val_loss: float, bytes_by_stream: dict[str, int]) -> dict:
        per: dict[str, dict] = {}
        for s, (full0, reuse0, saved0, sent0) in self._marks.items():
            full, reuse, saved = (a - b for a, b in zip(self._counts(s), (full0, reuse0, saved0), strict=True))
            sent = bytes_by_stream.get(s, 0) - sent0
            per[s] = {"threshold": self.thresholds.get(s, 1.0), "reuse_ratio": reuse / max(full + reuse, 1),
                      "bytes": sent, "bytes_without_reuse": sent + saved}
        main = per.get("act_up", next(iter(per.values())))
        record = {"epoch": epoch, "threshold": self.threshold, "reuse_ratio": main["reuse_ratio"],
                  "act_up_bytes": per.get("act_up", main)["bytes"],
                  "act_up_bytes_without_reuse": per.get("act_up", main)["bytes_without_reuse"], "val_loss": val_loss}
        if len(self.streams) > 1:
            record["streams"] = per
        if drift := self.drift():
            record["drift"] = drift
        self.by_epoch.append(record)
        for s, ctrl in self.controllers.items():
            self.thresholds[s] = ctrl.update(IntervalStats(
                progress=min(epoch / self.epochs, 1.0), threshold=per[s]["threshold"],
                reuse_ratio=per[s]["reuse_ratio"], val_loss=val_loss, bytes_sent=per[s]["bytes"],
                bytes_full=per[s]["bytes_without_reuse"]))
        return record

    def _ends(self) -> list:
        ends = [(st.name, e) for c in self.clients for st, e in getattr(c, "out", {}).items()]
        if self.server is not None:
            ends += [(st.name, e) for by in self.server.out.values() for st, e in by.items()]
        return ends

    def drift(self) -> dict[str, dict]:
        """The epoch's true drift by stream (``logging.drift``; compress/drift.py), from every sending end."""
        values: dict[str, dict[str, list[float]]] = {}
        for name, e in self._ends():
            if getattr(e, "drift", None) is not None:
                got = e.drift.take()
                acc = values.setdefault(name, {k: [] for k in KINDS})
                for k in KINDS:
                    acc[k] += got[k]
        return {name: st for name, v in sorted(values.items()) if (st := stats(v))}

    @property
    def reuse_ratio(self) -> float:
        full, reuse, _ = self._counts("act_up")
        return reuse / max(full + reuse, 1)

    def by_stream(self) -> dict[str, float]:
        """Reuse ratio of every tensor stream, whichever side sends it."""
        return {s: c["reuse"] / max(c["full"] + c["delta"] + c["reuse"], 1) for s, c in self.transfers().items()}

    def transfers(self) -> dict[str, dict[str, int]]:
        """Per tensor stream, summed over every end that sends it: FULL / REUSE / DELTA samples, DELTA
        bytes, prompt-prefix rows shared and the bytes they saved, and the senders' cache memory. The
        clients may be deployment's reports of them (deploy/coordinator.py, ClientStats)."""
        return add_counts(*(c.stream_counts() for c in self.clients),
                          *([self.server.stream_counts()] if self.server is not None else []))

    def state_dict(self) -> dict:
        """Thresholds, history and the controllers' plain state (bang-bang's level and references). A DDPG
        agent is saved on its own (``save``) and warm-started from that file."""
        simple = (int, float, str, bool, type(None))
        ctrl = {s: {k: v for k, v in vars(c).items() if isinstance(v, simple)}
                for s, c in self.controllers.items()} if self.cfg.controller != "ddpg" else {}
        return {"thresholds": self.thresholds, "by_epoch": self.by_epoch, "controllers": ctrl, "marks": self._marks}

    def load_state_dict(self, st: dict) -> None:
        self.thresholds, self.by_epoch = dict(st["thresholds"]), list(st["by_epoch"])
        self._marks = {k: list(v) for k, v in st["marks"].items()}
        for s, c in self.controllers.items():
            vars(c).update(st["controllers"].get(s, {}))

    def save_agent(self, path: Path) -> str | None:
        """The DDPG agents (with their replay buffers): ``path``, or ``<stem>-<stream>.zip`` per stream when
        several streams have one; nothing for the other controllers."""
        if self.cfg.controller != "ddpg" or not self.controllers:
            return None
        saved = [c.save(agent_path(path, s, self.streams)) for s, c in self.controllers.items()]
        return saved[0] if len(saved) == 1 else str(path.parent)

    def save(self, out: Path) -> str | None:
        return self.save_agent(out / "ddpg_agent.zip")


def agent_path(path: Path, stream: str, streams: list[str]) -> Path:
    return path if len(streams) <= 1 else path.with_name(f"{path.stem}-{stream}{path.suffix}")
