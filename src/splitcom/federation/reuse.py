"""Per-epoch bookkeeping of temporal reuse and the threshold controller that sets the next epoch's
threshold (compress/control.py). Kept out of the rounds loop so the loop stays readable."""

from __future__ import annotations

from pathlib import Path

from splitcom.compress.control import IntervalStats, make_controller
from splitcom.config import TemporalCfg
from splitcom.errors import UserError


class ReuseControl:
    def __init__(self, cfg: TemporalCfg, clients: list, hidden: int, epochs: int, seed: int, server=None):
        if cfg.enabled and cfg.projection_dim > hidden:
            raise UserError(f"must be <= the hidden size {hidden} (got {cfg.projection_dim})",
                            where="compression.temporal.projection_dim")
        self.cfg, self.clients, self.epochs, self.server = cfg, clients, epochs, server
        self.controller = None
        if cfg.enabled:
            options = {"fixed": {"threshold": cfg.threshold}, "bangbang": cfg.bangbang.model_dump(),
                       "ddpg": cfg.ddpg.model_dump()}[cfg.controller]
            self.controller = make_controller(cfg.controller, options, seed=seed)
        self.threshold = self.controller.initial() if self.controller else 1.0
        self.by_epoch: list[dict] = []
        self._full = self._reuse = self._saved = self._act = 0

    def begin_epoch(self, act_up_bytes: int) -> None:
        for c in self.clients:
            c.threshold = self.threshold
        if self.server is not None:  # the server sends grad_down (and act_down in U-shape)
            self.server.set_threshold(self.threshold)
        self._full = sum(c.sent_full for c in self.clients)
        self._reuse = sum(c.sent_reuse for c in self.clients)
        self._saved = sum(c.bytes_saved for c in self.clients)
        self._act = act_up_bytes

    def end_epoch(self, epoch: int, val_loss: float, act_up_bytes: int) -> dict:
        full = sum(c.sent_full for c in self.clients) - self._full
        reuse = sum(c.sent_reuse for c in self.clients) - self._reuse
        sent = act_up_bytes - self._act
        record = {"epoch": epoch, "threshold": self.threshold, "reuse_ratio": reuse / max(full + reuse, 1),
                  "act_up_bytes": sent, "act_up_bytes_without_reuse": sent + sum(
                      c.bytes_saved for c in self.clients) - self._saved, "val_loss": val_loss}
        self.by_epoch.append(record)
        if self.controller is not None:
            self.threshold = self.controller.update(IntervalStats(
                progress=min(epoch / self.epochs, 1.0), threshold=record["threshold"],
                reuse_ratio=record["reuse_ratio"], val_loss=val_loss, bytes_sent=sent,
                bytes_full=record["act_up_bytes_without_reuse"]))
        return record

    @property
    def reuse_ratio(self) -> float:
        full = sum(c.sent_full for c in self.clients)
        reuse = sum(c.sent_reuse for c in self.clients)
        return reuse / max(full + reuse, 1)

    def by_stream(self) -> dict[str, float]:
        """Reuse ratio of every tensor stream, whichever side sends it."""
        counts: dict[str, tuple[int, int]] = dict(self.server.reuse_by_stream()) if self.server else {}
        for c in self.clients:
            for stream, end in c.out.items():
                full, reuse = counts.get(stream.name, (0, 0))
                counts[stream.name] = (full + end.sent_full, reuse + end.sent_reuse)
        return {k: r / max(f + r, 1) for k, (f, r) in sorted(counts.items())}

    def state_dict(self) -> dict:
        """Threshold, history and the controller's plain state (bang-bang's level and references). A DDPG
        agent is saved on its own (``save``) and warm-started from that file."""
        simple = (int, float, str, bool, type(None))
        ctrl = {k: v for k, v in vars(self.controller).items() if isinstance(v, simple)} \
            if self.controller is not None and self.cfg.controller != "ddpg" else {}
        return {"threshold": self.threshold, "by_epoch": self.by_epoch, "controller": ctrl,
                "marks": [self._full, self._reuse, self._saved, self._act]}

    def load_state_dict(self, st: dict) -> None:
        self.threshold, self.by_epoch = st["threshold"], list(st["by_epoch"])
        self._full, self._reuse, self._saved, self._act = st["marks"]
        if self.controller is not None:
            vars(self.controller).update(st["controller"])

    def save_agent(self, path: Path) -> str | None:
        """The DDPG agent (with its replay buffer) to ``path``; nothing for the other controllers."""
        if self.controller is None or self.cfg.controller != "ddpg":
            return None
        return self.controller.save(path)

    def save(self, out: Path) -> str | None:
        return self.save_agent(out / "ddpg_agent.zip")
