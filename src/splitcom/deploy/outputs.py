"""What the server process keeps and writes: the checkpoint after every finished round (and resume from
it), and summary.json. Functions of the ServerDriver ``self``."""

from __future__ import annotations

import math
import time

import torch

from splitcom.deploy.plan import log
from splitcom.errors import UserError
from splitcom.federation.setup import tail_layers
from splitcom.runlog import CHECKPOINT, atomic_save, peak_rss_bytes


def save_checkpoint(self, t0: float) -> None:
    state = {
        "version": 3, "next_round": self.next_round, "session": self.session,
        "server": self.server.state_dict(), "fleet": self.fleet.state_dict(),
        "losses": self.losses, "val_losses": self.val_losses, "train_losses": self.train_losses,
        "init_loss": self.init_loss, "drops": self.drops, "resumed_at": self.resumed_at,
        "wall_s": self.wall_before + time.perf_counter() - t0,
        "stats": {cid: dict(vars(st)) for cid, st in self.stats.items()},
        "reuse": self.reuse.state_dict(),
        "counters": {name: getattr(self.counters, name).state_dict() for name in ("serde", "wire")},
        "grpc_bytes": dict(self.counters.grpc), "rejected_bytes": dict(self.counters.rejected),
        "metrics_bytes": self.log.size, "pending": self.log.pending,
    }
    atomic_save(state, self.out / CHECKPOINT)


def load_checkpoint(self) -> None:
    path = self.out / CHECKPOINT
    if not path.is_file():
        raise UserError("no checkpoint to resume from (the run had not started training)", where=str(path))
    st = torch.load(path, weights_only=True)
    if st.get("version") != 3:
        raise UserError(f"checkpoint format {st.get('version')} is not this version's (3)", where=str(path))
    self.server.load_state_dict(st["server"])
    self.fleet.load_state_dict(st["fleet"])
    self.next_round = st["next_round"]
    self.losses, self.val_losses, self.train_losses = st["losses"], st["val_losses"], st["train_losses"]
    self.init_loss, self.drops = st["init_loss"], st["drops"]
    self.resumed_at = [*st["resumed_at"], self.next_round]
    self.wall_before = st["wall_s"]
    for cid, values in st["stats"].items():
        vars(self.stats[int(cid)]).update(values)
    self.reuse.load_state_dict(st["reuse"])
    for name, rows in st["counters"].items():
        getattr(self.counters, name).load_state_dict(rows)
    self.counters.grpc.update(st["grpc_bytes"])
    self.counters.rejected.update(st.get("rejected_bytes", {}))
    self.metrics_bytes = st["metrics_bytes"]  # RunLog keeps the log up to here
    self.pending_replay = st.get("pending", [])  # and writes again the events that came after it
    if self.cfg.compression.temporal.enabled:
        log.warning("resuming with temporal reuse: its caches restart empty, so the result is correct but "
                    "not bit-identical to an uninterrupted run")
    log.info("resuming %s at round %d of %d", self.out, self.next_round, len(self.plan))


def summary(self, t0: float) -> dict:
    cfg, s, serde_c, wire = self.cfg, self.s, self.counters.serde, self.counters.wire
    temporal_on = cfg.compression.temporal.enabled
    agent = self.reuse.save(self.out)
    return {
        "model": cfg.model.name, "mode": cfg.federation.mode, "num_clients": cfg.federation.num_clients,
        "epochs": cfg.train.epochs, "rounds": len(self.plan), "split_mode": cfg.split.mode,
        "cut_layer": cfg.split.cut_layer, "tail_layers": tail_layers(cfg),
        "num_layers": s.split.num_layers, "hidden_size": s.split.hidden_size, "train_samples": len(s.train),
        "client_samples": [len(p) for p in s.partitions],
        "train_tokens": sum(st.tokens_forwarded for st in self.stats.values()),
        **serde_c.snapshot(),
        "initial_val_loss": self.init_loss, "val_loss": self.val_losses[-1],
        "val_ppl": math.exp(min(self.val_losses[-1], 50.0)), "val_loss_by_epoch": self.val_losses,
        "train_loss_by_epoch": self.train_losses,
        "wall_s": self.wall_before + time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(),
        "reuse_ratio": self.reuse.reuse_ratio,
        "reuse_ratio_by_epoch": [r["reuse_ratio"] for r in self.reuse.by_epoch],
        "reuse_ratio_by_stream": self.reuse.by_stream(), "transfers_by_stream": self.reuse.transfers(),
        "threshold_by_epoch": [r["threshold"] if temporal_on else None for r in self.reuse.by_epoch],
        "client_cache_bytes": sum(st.cache_bytes for st in self.stats.values()),
        "server_cache_bytes": self.server.cache_bytes,
        "server_state_bytes": self.server.state_bytes()["total"], "server_state": self.server.state_bytes(),
        "cuts": [self.server.cuts[c] for c in sorted(self.server.cuts)], "cuts_by_round": self.fleet.history,
        **({"ddpg_agent": agent} if agent else {}),
        # deployment only
        "transport": "grpc", "schedule": cfg.federation.schedule,
        "wire_bytes_up": wire.up, "wire_bytes_down": wire.down, "wire_bytes_by_stream": wire.by_stream(),
        "envelope_bytes": wire.up + wire.down - serde_c.up - serde_c.down,
        "grpc_message_bytes": dict(self.counters.grpc),
        "rejected_bytes": dict(sorted(self.counters.rejected.items())),
        "dropped": self.drops, "resumed_at_rounds": self.resumed_at,
    }

