"""The loop of ``splitcom client``: join, train each round's steps over the gRPC channel with simulation's
SplitClient, upload, download; rejoin after a drop or a server restart."""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
from dataclasses import dataclass

import yaml

from splitcom.config import build_config
from splitcom.deploy.plan import (
    PREPARE_LOCK,
    AuthFailure,
    DeployError,
    TlsMismatch,
    VersionMismatch,
    check_deployable,
    client_blocks,
    client_cuts,
    fault,
    forget_summaries,
    log,
    partition_digest,
    round_plan,
)
from splitcom.errors import ProtocolError, UserError
from splitcom.federation.setup import make_client, prepare, steps_per_epoch, tail_layers
from splitcom.models.adapters import GLOBAL
from splitcom.models.hold import hold_only
from splitcom.runlog import peak_rss_bytes, rss_bytes
from splitcom.transport.grpc_client import (
    AuthRefused,
    Disconnected,
    Dropped,
    GrpcChannel,
    GrpcClient,
    RunAborted,
)
from splitcom.transport.security import tls_mismatch


@dataclass
class ClientOptions:
    server: str  # HOST:PORT
    client_id: int
    token: str
    tls_ca: str | None = None
    tls_cert: str | None = None  # mutual TLS
    tls_key: str | None = None
    data: str | None = None  # overrides data.dataset (where this client's copy of the data lives)
    device: str | None = None  # overrides train.device
    reconnect_s: float = 120.0  # how long to keep trying to reach a server that went away
    heartbeat_s: float = 10.0
    state_dir: str | None = None  # where the optimizer state of each round's start survives a restart


COUNTERS = ("tokens_forwarded", "sent_full", "sent_reuse", "bytes_saved")


def upload_stats(now: dict, before: dict, cache_bytes: int) -> dict:
    """The pb.ClientStats fields of an upload: counters since the previous one (``before``), but the
    cache bytes, which are absolute, as are each stream's sender cache bytes (``transfers``, keyed
    "<stream>.<counter>")."""
    old = before.get("transfers", {})
    transfers = {f"{s}.{k}": v - (0 if k == "cache_bytes" else old.get(s, {}).get(k, 0))
                 for s, counts in now["transfers"].items() for k, v in counts.items()}
    return {**{k: now[k] - before.get(k, 0) for k in COUNTERS}, "cache_bytes": cache_bytes, "transfers": transfers}


def thresholds_of(reply) -> float | dict[str, float]:
    """The per-stream thresholds of a JoinReply/PullReply, or its one threshold for every stream."""
    return dict(reply.thresholds) if reply.thresholds else reply.threshold


class ClientDriver:
    """The loop of one client process: the server's config, the same plan of rounds, SplitClient steps."""

    def __init__(self, opts: ClientOptions):
        self.opts, self.cid = opts, opts.client_id
        self.conn = GrpcClient(opts.server, opts.client_id, opts.token, ca=opts.tls_ca, cert=opts.tls_cert,
                               key=opts.tls_key)
        self.channel = GrpcChannel(self.conn)
        self.snaps: dict[int, dict] = {}  # round -> optimizer state at its start (the last two rounds)
        self.cur_round: int | None = None
        self.pushed, self.threshold, self.steps, self.rejected, self.rejoins = False, 1.0, 0, 0, 0
        self.last_pushed: dict = {}  # the counters at the previous upload (``_counters``)
        self._stop = threading.Event()
        self._batches: dict[int, list] = {}
        self._fired: set[str] = set()

    def connect(self) -> None:
        """Fetch the run config from the server and prepare model, data and SplitClient."""
        try:
            self._prepare(self._retry(self.conn.hello))
            self._load_snaps()
        except AuthRefused as err:
            raise AuthFailure(f"the server refused client {self.cid}: {err}") from None
        except Dropped as err:  # FAILED_PRECONDITION on Hello: a protocol this server does not speak
            raise VersionMismatch(f"the server refused client {self.cid}: {err}") from None

    def run(self) -> dict:
        try:
            if not hasattr(self, "sc"):
                self.connect()
            threading.Thread(target=self._heartbeats, daemon=True, name=f"heartbeat{self.cid}").start()
            while True:
                try:
                    self._retry(self.sc.join)
                    j = self.channel.last_join
                    log.info("client %d joined session %s at round %d of %d", self.cid, j.session, j.start_round,
                             len(self.plan))
                    if j.finished or self._enter(j.start_round, thresholds_of(j)):
                        break
                    if any(self._round(r) for r in range(j.start_round, len(self.plan))):
                        break
                    break
                except (Dropped, Disconnected) as err:
                    self.rejoins += 1
                    if self.rejoins > 50:
                        raise DeployError(f"gave up after {self.rejoins} attempts to rejoin: {err}") from None
                    log.warning("client %d: %s; joining again", self.cid, err)
                    self.channel.reset_stream()
        except AuthRefused as err:
            raise AuthFailure(f"the server refused client {self.cid}: {err}") from None
        except RunAborted as err:
            raise DeployError(f"the server aborted the run: {err}") from None
        except ProtocolError as err:  # a join, upload or download the server refused: a bug or a mismatch
            raise DeployError(f"the server refused a message of client {self.cid}: {err}") from None
        finally:
            self._stop.set()
            self.channel.reset_stream()
            self.conn.close()
        c = self.channel.counter
        return {"client": self.cid, "steps": self.steps, "rejected_steps": self.rejected, "rejoins": self.rejoins,
                "bytes_up": c.up, "bytes_down": c.down, "bytes_by_stream": c.by_stream(),
                "grpc_message_bytes": dict(self.conn.grpc_bytes),
                # the process's memory (the device's, measured): its peak, before the model was loaded (the
                # python, torch and gRPC runtime), and at the end of the run
                "peak_rss_bytes": peak_rss_bytes(), "rss_before_model_bytes": self.rss_before_model,
                "rss_bytes": rss_bytes()}

    def _retry(self, fn):
        """Call ``fn`` until the server answers (it may not be up yet, or be restarting)."""
        deadline, delay = time.monotonic() + self.opts.reconnect_s, 0.1
        while True:
            try:
                return fn()
            except Disconnected as err:
                why = tls_mismatch(self.opts.server, self.opts.tls_ca)  # a TLS mistake never heals:
                if why is not None:  # say so at once instead of retrying for reconnect_s
                    raise TlsMismatch(why) from None
                if time.monotonic() > deadline:
                    raise DeployError(f"server {self.opts.server} unreachable for {self.opts.reconnect_s:g} s "
                                      f"({err})") from None
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

    def _prepare(self, hello) -> None:
        overrides = [f"data.dataset={self.opts.data}"] if self.opts.data else []
        overrides += [f"train.device={self.opts.device}"] if self.opts.device else []
        cfg = build_config(yaml.safe_load(hello.config_yaml), overrides)
        check_deployable(cfg)
        self.rss_before_model = rss_bytes()
        with PREPARE_LOCK:  # the model holds only the blocks this client may run (models/hold.py)
            s = prepare(cfg, lambda model_config: client_blocks(cfg, model_config, self.cid))
            # the model loads before the data is partitioned; the stream state this client keeps for its
            # samples may leave room for fewer blocks (memory_fit, adaptive): drop those too
            keep = client_blocks(cfg, s.split.lm.config, self.cid, [len(p) for p in s.partitions])
            if keep is not None:
                hold_only(s.split.lm, keep, head=tail_layers(cfg) > 0)
            if partition_digest(s, self.cid) != hello.partition_digest:
                raise UserError("this client's data gives a different partition than the server's (it needs the "
                                "same dataset, config and seed)", where=self.opts.data or "data.dataset")
            self.sc = make_client(s, self.cid, client_cuts(s)[self.cid], self.channel)
        self.cfg, self.s = cfg, s
        self._run_id = hashlib.sha256(hello.config_yaml.encode() + hello.partition_digest).hexdigest()
        self.plan = round_plan(cfg.train.epochs, steps_per_epoch(s), cfg.federation.aggregate_every)

    def _state_file(self):
        from pathlib import Path

        return None if self.opts.state_dir is None else Path(self.opts.state_dir) / f"client-{self.cid}.pt"

    def _save_snaps(self) -> None:
        """The round-start optimizer states to --state-dir (atomically), so a restarted process replays a
        round exactly as a surviving one does; tagged with the run (config and this client's partition)."""
        path = self._state_file()
        if path is not None:
            from splitcom.runlog import atomic_save

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"run": self._run_id, "snaps": self.snaps}, path)

    def _load_snaps(self) -> None:
        import torch

        path = self._state_file()
        if path is None or not path.is_file():
            return
        saved = torch.load(path, weights_only=True)
        if saved.get("run") != self._run_id:
            log.warning("client %d: %s holds the state of another run (other config or data); not used", self.cid,
                        path)
            return
        self.snaps = saved["snaps"]
        log.info("client %d: optimizer state of round(s) %s from %s", self.cid, sorted(self.snaps), path)

    def _counters(self) -> dict:
        return {**{k: int(getattr(self.sc, k, 0)) for k in COUNTERS}, "transfers": self.sc.stream_counts()}

    def _enter(self, start: int, threshold: float | dict[str, float]) -> bool:
        """Get ready to train round ``start``: the optimizer state of its start where we have it, the
        server's global adapter, empty label and reuse caches (the server may have lost them)."""
        sc, fresh = self.sc, self.cur_round is None
        if not (fresh and start == 0):
            if not fresh and start == self.cur_round + 1 and self.pushed:
                pass  # our state is the end of cur_round = the start of ``start``
            elif start in self.snaps:
                sc.optimizer.load_state_dict(copy.deepcopy(self.snaps[start]))
            elif not fresh:
                log.warning("client %d: rejoining at round %d with its current optimizer state (not an exact "
                            "replay of an uninterrupted run)", self.cid, start)
            else:  # a new process joining a run past its start: its AdamW state is gone
                log.warning("client %d: joining at round %d with an empty optimizer state: the run will not end "
                            "bit-identical to an uninterrupted one (pass --state-dir to keep the state across "
                            "client restarts)", self.cid, start)
            if start == 0:
                sc.bank.load(sc.adapter, sc.bank.state(GLOBAL, range(sc.cut)))
                sc.hold()  # the server's mirror of a client starts from the global adapter too
            else:
                sc.pull_adapters(start - 1)
                threshold = thresholds_of(self.channel.last_pull)
            sc.labels_sent.clear()
            forget_summaries(sc.out.values())
            self.last_pushed = self._counters()  # report only what the server will see from now on
        self.threshold = threshold
        return start >= len(self.plan)

    def _round(self, r: int) -> bool:
        """Train round r; True when the server says the run is finished."""
        spec, sc = self.plan[r], self.sc
        self.snaps = {k: v for k, v in self.snaps.items() if k >= r - 1}
        self.snaps[r] = copy.deepcopy(sc.optimizer.state_dict())
        self._save_snaps()
        self.cur_round, self.pushed = r, False
        sc.threshold = self.threshold
        if spec.epoch not in self._batches:
            self._batches = {spec.epoch: sc.epoch_batches(spec.epoch)}
        batches, losses = self._batches[spec.epoch], []
        for step in range(spec.first_step, min(spec.end_step, len(batches))):
            self._fault_point()
            self.channel.step_started()
            try:
                losses.append(sc.train_step(batches[step], spec.global_step(step)))
            except ProtocolError as err:  # the server rejected this step; the next one goes on
                self.rejected += 1
                log.error("client %d: step %d rejected: %s", self.cid, spec.global_step(step), err)
            self.channel.step_finished()
            self.steps += 1
        now = self._counters()
        local = {"losses": losses} if self.cfg.federation.mode == "fl" else {}  # (the server saw no step)
        self.channel.stats = lambda: {**upload_stats(now, self.last_pushed, int(sc.cache_bytes)), **local}
        sc.push_adapters(r)
        self.pushed, self.last_pushed = True, now
        if self.opts.state_dir is not None:  # the end of round r is the start of r + 1, if we die before it
            self.snaps[r + 1] = copy.deepcopy(sc.optimizer.state_dict())
            self._save_snaps()
        sc.pull_adapters(r)
        self.threshold = thresholds_of(self.channel.last_pull)
        log.info("client %d: round %d done (%d steps, mean loss %s)", self.cid, r, len(losses),
                 f"{sum(losses) / len(losses):.4f}" if losses else "-")
        return self.channel.last_pull.finished

    def _fault_point(self) -> None:
        if fault("CLIENT_EXIT_AFTER_STEPS") == self.steps:
            log.error("fault injection: client %d exits after %d steps", self.cid, self.steps)
            os._exit(17)
        if fault("CLIENT_HANG_AFTER_STEPS") == self.steps and "hang" not in self._fired:
            self._fired.add("hang")
            seconds = fault("CLIENT_HANG_S") or 3600
            log.error("fault injection: client %d hangs for %d s after %d steps", self.cid, seconds, self.steps)
            time.sleep(seconds)

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.opts.heartbeat_s):
            try:
                self.conn.heartbeat(-1 if self.cur_round is None else self.cur_round, timeout=5.0)
            except Exception:  # noqa: BLE001 - liveness only; the main loop handles a lost server
                pass
