"""The plan of rounds, the same on the server and on every client, and what both sides share."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np

from splitcom.config import Config
from splitcom.errors import UserError
from splitcom.federation.setup import Setup
from splitcom.fleet.fleet import Fleet

log = logging.getLogger("splitcom.deploy")
PREPARE_LOCK = threading.Lock()  # prepare() seeds torch's global RNG: one at a time per process

def fault(name: str) -> int | None:
    value = os.environ.get(f"SPLITCOM_FAULT_{name}")
    return int(value) if value else None



@dataclass(frozen=True)
class RoundSpec:
    index: int
    epoch: int
    first_step: int  # step indices [first_step, end_step) of the epoch
    end_step: int
    global_step0: int  # global step number of first_step
    ends_epoch: bool

    def global_step(self, step: int) -> int:
        return self.global_step0 + step - self.first_step


def round_plan(epochs: int, steps_per_epoch: int, every: str | int) -> list[RoundSpec]:
    """Simulation's aggregation points: every ``every`` step indices (restarting each epoch) and at
    each epoch end (see simulation.run)."""
    rounds: list[RoundSpec] = []
    g = 0
    for epoch in range(1, epochs + 1):
        start, g_start = 0, g
        for step in range(steps_per_epoch):
            g += 1
            if isinstance(every, int) and step + 1 - start >= every:
                rounds.append(RoundSpec(len(rounds), epoch, start, step + 1, g_start, step + 1 == steps_per_epoch))
                start, g_start = step + 1, g
        if start < steps_per_epoch:
            rounds.append(RoundSpec(len(rounds), epoch, start, steps_per_epoch, g_start, True))
    return rounds


def partition_digest(s: Setup, cid: int) -> bytes:
    h = hashlib.sha256()
    for i in s.partitions[cid]:
        ids = np.asarray(s.train[i].ids, dtype="<i4")
        h.update(len(ids).to_bytes(4, "little") + ids.tobytes())
    return h.digest()


def client_blocks(cfg: Config, model_config, cid: int, samples: list[int] | None = None) -> list[int] | None:
    """The decoder blocks deployed client ``cid`` may ever run, from the whole model's HF config: [0, its
    deepest cut) (its cut; adaptive: the deepest its device holds, as the server may move it there) and
    U-shape's tail; None (every block) in federated LoRA. ``samples`` (each client's training samples, known
    once the data is partitioned): the device also keeps its stream state, which may leave room for fewer
    blocks; without them, a superset."""
    if cfg.federation.mode != "sfl":
        return None
    fleet = Fleet(cfg, model_config, samples)
    deepest = fleet.limits[cid] if cfg.split.cut_policy == "adaptive" else fleet.cuts[cid]
    return list(range(deepest)) + list(range(fleet.num_layers - fleet.tail, fleet.num_layers))


def client_cuts(s: Setup) -> list[int]:
    """Each client's cut, as simulation chooses it (fixed, or memory_fit on the configured devices)."""
    return list(Fleet.of(s).cuts)


def forget_summaries(ends) -> None:
    """Empty the temporal senders of these stream ends: after a (re)join the receiving side may not hold
    what they remember, so every sample goes FULL once more."""
    for end in ends:
        if hasattr(end, "forget"):
            end.forget()


def check_deployable(cfg: Config) -> None:
    if cfg.federation.mode == "centralized":
        raise UserError("deployment runs federated training (`sfl` or `fl`), not the centralized baseline",
                        where="federation.mode")
    if cfg.federation.min_clients > cfg.federation.num_clients:
        raise UserError(f"must be <= federation.num_clients ({cfg.federation.num_clients})",
                        where="federation.min_clients")


class DeployError(Exception):
    """Ends a client or server process with ``exit_code`` and a one-line message."""

    exit_code = 4


class AuthFailure(DeployError):
    exit_code = 3


class TlsMismatch(DeployError):
    """TLS on one side only, or a server certificate the client's CA did not sign: bad flags, exit 2."""

    exit_code = 2


class VersionMismatch(DeployError):
    """The server does not speak this client's protocol version: nothing to retry."""

    exit_code = 2


