"""Deployment: the rounds loop of ``splitcom server`` and the loop of each ``splitcom client``.

The step logic is simulation's: the server process runs ``SplitServer.handle_bytes`` and
``aggregate``, every client process runs ``SplitClient`` over a ``GrpcChannel``. What deployment adds:

* a **turn gate**: clients compute concurrently, the server serves their step requests one at a time
  in the order of ``federation.schedule`` (``round_robin``: by step index, then client id, exactly
  simulation's lockstep, so a run ends with the same adapters as ``splitcom run``);
* **faults**: a client that does not send its next step or upload within
  ``federation.client_timeout_s`` (or whose connection closes) is dropped from the round; the round is
  aggregated if ``federation.min_clients`` finished it; the client may rejoin for the next round;
* **resume**: after every finished round the server checkpoints (OUT/checkpoint.pt: the global
  adapter, every adapter set and optimizer state it holds, counters, metrics position). Clients keep
  the optimizer state of their last two round starts in memory and clear their label cache when they
  join, so after ``splitcom server --resume OUT`` the surviving clients replay the interrupted round
  from the server's last global adapter: the final adapters equal those of an uninterrupted run when
  the clients survived the restart, the schedule is round_robin, LoRA dropout is 0 and temporal reuse
  is off (its caches are not checkpointed: after a restart both sides start them afresh). A client
  process that restarts begins with a fresh optimizer: correct, but no longer bit-identical.

Fault injection for tests (environment): SPLITCOM_FAULT_SERVER_EXIT_AFTER_TURNS=N and
SPLITCOM_FAULT_CLIENT_EXIT_AFTER_STEPS=N make the process exit hard (os._exit(17)) at that point;
SPLITCOM_FAULT_CLIENT_HANG_AFTER_STEPS=N (with SPLITCOM_FAULT_CLIENT_HANG_S) makes a client stall.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from splitcom.config import Config, build_config, dump_config
from splitcom.errors import ProtocolError, UserError
from splitcom.federation.fleet import Fleet
from splitcom.federation.reuse import ReuseControl
from splitcom.federation.schedule import Job, make_schedule
from splitcom.federation.setup import Setup, prepare, tail_layers
from splitcom.federation.simulation import make_client, make_server
from splitcom.models.adapters import GLOBAL
from splitcom.protocol import serde
from splitcom.protocol.messages import AdapterMsg, Stream
from splitcom.runlog import RunLog, peak_rss_bytes, write_json
from splitcom.transport.grpc_client import (
    AuthRefused,
    Disconnected,
    Dropped,
    GrpcChannel,
    GrpcClient,
    RunAborted,
)
from splitcom.transport.grpc_server import (
    DROPPED,
    TENSOR,
    Call,
    Counters,
    Rejected,
    SplitComService,
    adapter_weight,
    loss_of,
    start_server,
)
from splitcom.transport.security import TokenAuth

log = logging.getLogger("splitcom.deploy")
PREPARE_LOCK = threading.Lock()  # prepare() seeds torch's global RNG: one at a time per process
CHECKPOINT = "checkpoint.pt"


def fault(name: str) -> int | None:
    value = os.environ.get(f"SPLITCOM_FAULT_{name}")
    return int(value) if value else None


# ---- the plan of rounds: the same on the server and on every client ------------------------------
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


def batches_per_client(s: Setup) -> list[int]:
    return [math.ceil(len(p) / s.cfg.train.batch_size) for p in s.partitions]


def partition_digest(s: Setup, cid: int) -> bytes:
    h = hashlib.sha256()
    for i in s.partitions[cid]:
        ids = np.asarray(s.train[i].ids, dtype="<i4")
        h.update(len(ids).to_bytes(4, "little") + ids.tobytes())
    return h.digest()


def client_cuts(s: Setup) -> list[int]:
    """Each client's cut, as simulation chooses it (fixed, or memory_fit on the configured devices)."""
    return list(Fleet(s).cuts)


def forget_summaries(ends) -> None:
    """Empty the temporal senders of these stream ends: after a (re)join the receiving side may not hold
    what they remember, so every sample goes FULL once more."""
    for end in ends:
        sender = getattr(end, "sender", None)
        if sender is not None:
            sender.summaries.clear()
            sender.streak.clear()
            sender.last_similarity.clear()


def check_deployable(cfg: Config) -> None:
    if cfg.federation.mode != "sfl":
        raise UserError("deployment runs split federated training only (`sfl`)", where="federation.mode")
    if cfg.federation.min_clients > cfg.federation.num_clients:
        raise UserError(f"must be <= federation.num_clients ({cfg.federation.num_clients})",
                        where="federation.min_clients")


# ---- server side --------------------------------------------------------------------------------
@dataclass
class _Member:
    start: int  # first round it takes part in
    alive: bool = True
    stream: object | None = None
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class _Pending:
    call: Call
    labels: list[Call]
    gstep: int
    arrival: float


@dataclass
class _Round:
    spec: RoundSpec
    participants: set[int]
    remaining: dict[int, deque]  # cid -> global steps still to serve
    pending: dict[int, _Pending] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    uploads: dict[int, Call] = field(default_factory=dict)  # waiting to be served
    # U-shape: a step is two exchanges (act_up -> act_down, grad_up -> grad_down); the turn stays with the
    # client between them, as in simulation's lockstep
    awaiting_grad: dict[int, int] = field(default_factory=dict)  # cid -> step whose grad_up the gate awaits
    grad_up: dict[int, _Pending] = field(default_factory=dict)
    pushed: set[int] = field(default_factory=set)
    pulled: set[int] = field(default_factory=set)
    last_served: dict[int, float] = field(default_factory=dict)
    losses: dict[int, list[float]] = field(default_factory=dict)  # per client: this round's step losses
    started: float = field(default_factory=time.monotonic)
    aggregated: bool = False

    @property
    def active(self) -> set[int]:
        return self.participants - set(self.dropped)


@dataclass
class _ClientStats:
    """What ReuseControl and the summary read from a client, accumulated from its uploads."""

    sent_full: int = 0
    sent_reuse: int = 0
    bytes_saved: int = 0
    tokens_forwarded: int = 0
    cache_bytes: int = 0
    threshold: float = 1.0


class ServerDriver:
    """The rounds loop of the server process; also the ``Coordinator`` behind grpc_server."""

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False):
        check_deployable(cfg)
        self.cfg, self.out, fed = cfg, Path(out), cfg.federation
        self.out.mkdir(parents=True, exist_ok=True)
        with PREPARE_LOCK:
            self.s = prepare(cfg)
        self.fleet = Fleet(self.s)  # each client's cut: fixed, memory_fit, or moved between rounds (adaptive)
        self.server = make_server(self.s, dict(enumerate(self.fleet.cuts)),
                                  str(self.out / "cache") if cfg.compression.temporal.store == "disk" else None)
        self.batches = batches_per_client(self.s)
        self.plan = round_plan(cfg.train.epochs, max(self.batches), fed.aggregate_every)
        self.policy = make_schedule(fed.schedule, cfg.train.seed)
        self.timeout, self.session = fed.client_timeout_s, uuid.uuid4().hex[:12]
        self.counters = Counters()
        self.stats = {cid: _ClientStats() for cid in range(fed.num_clients)}
        self.reuse = ReuseControl(cfg.compression.temporal, list(self.stats.values()), self.s.split.hidden_size,
                                  cfg.train.epochs, cfg.train.seed, self.server)
        self.max_message_bytes = self._message_limit()
        self.step_streams = frozenset({Stream.act_up} | ({Stream.grad_up} if self.server.ushape else set()))
        self.cond = threading.Condition()
        self.members: dict[int, _Member] = {}
        self.current: _Round | None = None
        self.phase, self.failed = "waiting_for_clients", None
        self.losses: list[float] = []
        self.val_losses: list[float] = []
        self.train_losses: list[float] = []
        self.init_loss: float | None = None
        self.drops: list[dict] = []
        self.resumed_at: list[int] = []
        self.turns_served, self.wall_before, self.join_timeout_s = 0, 0.0, None
        self.est = {k: {} for k in ("forward", "service", "tail")}
        self.next_round = 0
        if resume:
            self._load_checkpoint()
        else:
            (self.out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        self.released = self.next_round - 1  # pulls for rounds <= released are answered
        self.log = RunLog(self.out / "metrics.jsonl", append=resume)

    def _message_limit(self) -> int:
        """Twice the largest legitimate message of this run (fp32 activations of a full batch, the
        whole adapter), plus slack: anything larger is refused before it is parsed."""
        cfg, h = self.cfg, self.s.split.hidden_size
        act = serde.tensor_msg_bytes([cfg.data.max_length] * cfg.train.batch_size, h)
        adapter = len(serde.encode(AdapterMsg(Stream.adapters_up, 0, 0, 1.0, self.server.global_state)))
        return 2 * max(act, adapter) + (64 << 10)

    # ---- Coordinator: called from gRPC threads ----------------------------------------------------
    def hello(self, cid: int) -> dict:
        if not 0 <= cid < self.cfg.federation.num_clients:
            raise Rejected("INVALID_ARGUMENT", f"client id {cid} is not in this run "
                           f"(federation.num_clients = {self.cfg.federation.num_clients})", "client_id")
        return {"config_yaml": dump_config(self.cfg), "partition_digest": partition_digest(self.s, cid),
                "session": self.session, "max_message_bytes": self.max_message_bytes,
                "protocol_version": serde.VERSION}

    def join(self, call: Call) -> None:
        cid = call.cid
        with self.cond:
            reply = self.server.handle_bytes(cid, call.payload)
            start = self.next_round
            call.complete(reply, start_round=start, threshold=self.reuse.threshold, session=self.session,
                          finished=start >= len(self.plan))
            if call.status is not None:
                return
            if self.current is not None and cid in self.current.active and cid not in self.current.pushed:
                self._drop(self.current, cid, "it joined again (a new session)")
            forget_summaries(self.server.out[cid].values())
            self.members[cid] = _Member(start)
            log.info("client %d joined (first round %d)", cid, start)
            self.cond.notify_all()

    def heartbeat(self, cid: int, round_: int) -> dict:
        with self.cond:
            if cid in self.members:
                self.members[cid].last_seen = time.monotonic()
            r = self.current.spec.index if self.current is not None else self.next_round - 1
            return {"session": self.session, "round": r, "phase": self.phase}

    def stream_opened(self, cid: int) -> object:
        handle = object()
        with self.cond:
            if cid in self.members:
                self.members[cid].stream = handle
        return handle

    def stream_closed(self, cid: int, handle: object) -> None:
        with self.cond:
            m = self.members.get(cid)
            if m is None or m.stream is not handle:
                return  # an older session's stream
            m.stream, m.alive = None, False
            rnd = self.current
            if (rnd is not None and cid in rnd.active and cid not in rnd.pushed and cid not in rnd.uploads
                    and not rnd.aggregated):
                self._drop(rnd, cid, "its connection closed")
            self.cond.notify_all()

    def step(self, call: Call, labels: list[Call]) -> None:
        cid, g = call.cid, call.header.step
        if self.server.ushape and serde.peek_stream(call.payload) == Stream.grad_up:
            return self._second_half(call)
        with self.cond:
            while True:
                if self.failed or self.phase == "finished":
                    raise Rejected("ABORTED" if self.failed else DROPPED, self.failed or "the run is over")
                rnd, m = self.current, self.members.get(cid)
                if rnd is not None and cid in rnd.active and g in rnd.remaining[cid]:
                    break
                if rnd is not None and cid in rnd.active and rnd.remaining[cid] and g < rnd.remaining[cid][0]:
                    raise Rejected("INVALID_ARGUMENT", f"step {g} was already served or skipped", "header.step")
                early = (m is not None and m.alive and self.next_round < len(self.plan) and m.start <= self.next_round
                         and g >= self.plan[self.next_round].global_step0)
                if not early or not call.is_active():
                    r = rnd.spec.index if rnd is not None else self.next_round
                    raise Rejected(DROPPED, f"step {g} of client {cid} is not expected in round {r} (dropped, or "
                                   "not joined for it): join again", "header.step")
                self.cond.wait(0.5)  # a request for the next round, which has not begun yet
            old = rnd.pending.pop(cid, None)
            if old is not None:
                old.call.reject(DROPPED, "superseded by a newer request", "header.step")
            rnd.pending[cid] = _Pending(call, labels, g, time.monotonic())
            self._estimate("forward", cid, call.request.forward_s)
            self._estimate("tail", cid, call.request.backward_s)
            self.cond.notify_all()
        while not call.done.wait(1.0):
            with self.cond:
                if self.failed:
                    raise Rejected("ABORTED", self.failed)

    def _second_half(self, call: Call) -> None:
        """U-shape: hand the grad_up of the step being served to the gate that holds the turn."""
        cid, g = call.cid, call.header.step
        with self.cond:
            rnd = self.current
            if rnd is None or rnd.awaiting_grad.get(cid) != g:
                raise Rejected("INVALID_ARGUMENT", f"grad_up for step {g} of client {cid} without its act_up "
                               "being served", "header.step")
            rnd.grad_up[cid] = _Pending(call, [], g, time.monotonic())
            self.cond.notify_all()
        while not call.done.wait(1.0):
            with self.cond:
                if self.failed:
                    raise Rejected("ABORTED", self.failed)

    def _await_grad_up(self, rnd: _Round, cid: int, g: int) -> _Pending | None:
        """U-shape: wait for the client's grad_up of step ``g`` (None: it was dropped meanwhile)."""
        with self.cond:
            rnd.awaiting_grad[cid] = g
            t0 = time.monotonic()
            while cid not in rnd.grad_up:
                if cid in rnd.active and time.monotonic() - t0 > self.timeout:
                    self._drop(rnd, cid, f"no grad_up for step {g} within client_timeout_s = {self.timeout:g} s")
                if cid not in rnd.active:
                    rnd.awaiting_grad.pop(cid, None)
                    self.server.pending.pop(cid, None)  # the half-done step is abandoned
                    return None
                self.cond.wait(0.25)
            rnd.awaiting_grad.pop(cid)
            return rnd.grad_up.pop(cid)

    def labels(self, calls: list[Call]) -> None:
        for call in calls:
            call.complete(self.server.handle_bytes(call.cid, call.payload))

    def push(self, call: Call) -> None:
        cid, r = call.cid, call.header.step
        with self.cond:
            rnd = self.current
            if rnd is None or rnd.spec.index != r or cid not in rnd.active or cid in rnd.pushed:
                raise Rejected(DROPPED, f"no upload expected from client {cid} for round {r}", "round")
            if cid in rnd.uploads:
                raise Rejected("INVALID_ARGUMENT", f"round {r}: client {cid} already uploaded", "round")
            samples = len(self.s.partitions[cid])  # the server knows the FedAvg weight; it does not take a claim
            if len(call.payload) < 25 or adapter_weight(call.payload) != samples:
                raise Rejected("INVALID_ARGUMENT", f"FedAvg weight must be the client's {samples} samples", "weight")
            rnd.remaining[cid].clear()  # an upload ends the client's round
            rnd.uploads[cid] = call  # served by the rounds loop, in client order (as simulation pushes)
            self.cond.notify_all()
        while not call.done.wait(1.0):
            with self.cond:
                if self.failed:
                    raise Rejected("ABORTED", self.failed)

    def pull(self, call: Call) -> None:
        r = call.header.step
        if r >= len(self.plan):
            raise Rejected("INVALID_ARGUMENT", f"there is no round {r} (the run has {len(self.plan)})", "header.step")
        with self.cond:
            while self.released < r and not self.failed and call.is_active():
                self.cond.wait(0.5)
            if self.failed:
                raise Rejected("ABORTED", self.failed)
            if self.released < r:
                raise Rejected("CANCELLED", "the client went away")
            threshold, finished = self.reuse.threshold, r >= len(self.plan) - 1
        call.complete(self.server.handle_bytes(call.cid, call.payload), threshold=threshold, finished=finished)
        with self.cond:
            if self.current is not None and self.current.spec.index == r:
                self.current.pulled.add(call.cid)
            self.cond.notify_all()

    # ---- the rounds loop (main thread) --------------------------------------------------------------
    def listen(self, bind: str, tokens: dict[int, str], credentials=None) -> int:
        """Start the gRPC service in front of this driver; returns the bound port."""
        service = SplitComService(self, TokenAuth(tokens), self.counters)
        self.grpc_server, port = start_server(service, bind, credentials, min(4 * self.max_message_bytes, 2**31 - 1),
                                              max_workers=4 * self.cfg.federation.num_clients + 8)
        return port

    def serve(self) -> dict:
        """Run all rounds, then stop listening (after the clients' last downloads)."""
        try:
            return self.run()
        except BaseException as err:
            self.fail(str(err) or type(err).__name__)
            raise
        finally:
            self.grpc_server.stop(grace=5.0).wait(10.0)

    def run(self) -> dict:
        t0 = time.perf_counter()
        if self.next_round < len(self.plan):  # (a resumed run may have nothing left to do)
            self._wait_for_clients()
        if self.init_loss is None:
            self.init_loss = self._validate(0, t0)
            self._save_checkpoint(t0)
        for spec in self.plan[self.next_round:]:
            rnd = self._begin(spec)
            if spec.first_step == 0:
                self.reuse.begin_epoch(self.counters.serde.by_stream().get("act_up", 0))
                self.losses = []
            self._train(rnd)
            self._collect_uploads(rnd)
            self._finish(rnd, t0)
        with self.cond:
            self.phase = "finished"
            self.cond.notify_all()
        self.log.close()
        summary = self._summary(t0)
        write_json(self.out / "summary.json", summary)
        return summary

    def fail(self, reason: str) -> None:
        with self.cond:
            self.failed, self.phase = reason, "failed"
            if self.current is not None:
                for call in [*(w.call for w in self.current.pending.values()), *self.current.uploads.values()]:
                    if not call.done.is_set():
                        call.reject("ABORTED", reason)
            self.cond.notify_all()

    def _wait_for_clients(self) -> None:
        """All configured clients, or after ``join_timeout_s`` at least federation.min_clients."""
        n, start = self.cfg.federation.num_clients, self.next_round
        log.info("waiting for %d clients (round %d of %d next)", n, start, len(self.plan))
        t0 = time.monotonic()
        with self.cond:
            while sum(m.alive for m in self.members.values()) < n:
                if self.join_timeout_s is not None and time.monotonic() - t0 > self.join_timeout_s:
                    if sum(m.alive for m in self.members.values()) >= self.cfg.federation.min_clients:
                        break
                    raise DeployError(f"fewer than federation.min_clients joined within {self.join_timeout_s:g} s")
                self.cond.wait(1.0)

    def _begin(self, spec: RoundSpec) -> _Round:
        with self.cond:
            t0 = time.monotonic()
            while True:
                parts = {cid for cid, m in self.members.items() if m.alive and m.start <= spec.index}
                if len(parts) >= self.cfg.federation.min_clients:
                    break
                if time.monotonic() - t0 > self.timeout:
                    raise DeployError(f"round {spec.index}: only {len(parts)} clients connected within "
                                      f"{self.timeout:g} s, fewer than federation.min_clients")
                self.cond.wait(0.5)
            remaining = {cid: deque(spec.global_step(i) for i in range(spec.first_step, min(spec.end_step,
                                                                                        self.batches[cid])))
                         for cid in parts}
            self.current = rnd = _Round(spec, parts, remaining)
            self.next_round, self.phase = spec.index + 1, "training"
            self.cond.notify_all()
        log.info("round %d (epoch %d, steps %d-%d): clients %s", spec.index, spec.epoch, spec.first_step,
                 spec.end_step - 1, sorted(parts))
        return rnd

    def _train(self, rnd: _Round) -> None:
        spec = rnd.spec
        for step in range(spec.first_step, spec.end_step):
            g = spec.global_step(step)
            with self.cond:
                group = sorted(c for c in rnd.active if step < self.batches[c])
            if self.policy.planned:
                jobs = [self._job(c, self.est["forward"].get(c, 0.0)) for c in group]
                for cid in (self.policy.plan(jobs) if jobs else []):
                    w = self._await(rnd, [cid], g)
                    if w is not None:
                        self._serve(rnd, w, step)
            else:
                self.policy.reset([])
                todo, t0 = list(group), time.monotonic()
                while todo:
                    ready = self._await(rnd, todo, g, many=True)
                    if not ready:
                        continue
                    jobs = [self._job(w.call.cid, w.arrival - t0) for w in ready]
                    w = ready[self.policy.pick(jobs, time.monotonic() - t0)]
                    with self.cond:
                        if rnd.pending.get(w.call.cid) is not w:
                            continue  # dropped meanwhile
                        del rnd.pending[w.call.cid]
                    todo.remove(w.call.cid)
                    self._serve(rnd, w, step)

    def _await(self, rnd: _Round, cids: list[int], g: int, many: bool = False):
        """Wait for step ``g`` from ``cids`` (one: pop and return it; many: return all arrived, leaving them
        pending); drops a client after client_timeout_s of silence, skips a turn the client went past.
        ``cids`` loses the clients that are dropped or skipped."""
        with self.cond:
            while True:
                now, ready = time.monotonic(), []
                for cid in list(cids):
                    w, queue = rnd.pending.get(cid), rnd.remaining.get(cid, deque())
                    if cid not in rnd.active or g not in queue:
                        cids.remove(cid)
                    elif w is not None and w.gstep > g:  # its step g was refused before the gate
                        queue.remove(g)
                        cids.remove(cid)
                    elif w is not None:
                        ready.append(w)
                    elif now - max(rnd.started, rnd.last_served.get(cid, 0.0)) > self.timeout:
                        self._drop(rnd, cid, f"no step {g} within client_timeout_s = {self.timeout:g} s")
                        cids.remove(cid)
                if ready or not cids:
                    if not many and ready:
                        return rnd.pending.pop(ready[0].call.cid)
                    return ready if many else None
                self.cond.wait(0.25)

    def _serve(self, rnd: _Round, w: _Pending, step: int) -> None:
        cid = w.call.cid
        for lab in w.labels:
            lab.complete(self.server.handle_bytes(cid, lab.payload))
        t = time.perf_counter()
        reply = self.server.handle_bytes(cid, w.call.payload)
        service = time.perf_counter() - t
        w.call.complete(reply)
        if self.server.ushape and reply and reply[3] == TENSOR:  # act_down went out: the step's second half
            second = self._await_grad_up(rnd, cid, w.gstep)
            if second is None:
                return
            t = time.perf_counter()
            reply = self.server.handle_bytes(cid, second.call.payload)
            service += time.perf_counter() - t
            second.call.complete(reply)
        self._estimate("service", cid, service)
        with self.cond:
            queue = rnd.remaining[cid]
            while queue and queue[0] < w.gstep:
                queue.popleft()
            if queue and queue[0] == w.gstep:
                queue.popleft()
            rnd.last_served[cid] = time.monotonic()
            self.cond.notify_all()
        if reply and reply[3] == TENSOR:
            loss = loss_of(reply)
            self.losses.append(loss)
            rnd.losses.setdefault(cid, []).append(loss)
            if w.gstep % self.cfg.logging.log_every == 0:
                self.log.write("step", epoch=rnd.spec.epoch, step=step, client=cid, loss=loss,
                               bytes_up=self.counters.serde.up, bytes_down=self.counters.serde.down)
        self.turns_served += 1
        if fault("SERVER_EXIT_AFTER_TURNS") == self.turns_served:
            log.error("fault injection: server exits after %d turns", self.turns_served)
            os._exit(17)

    def _collect_uploads(self, rnd: _Round) -> None:
        with self.cond:
            self.phase = "aggregating"
            for w in rnd.pending.values():  # only a client that uploaded before its last step leaves one
                w.call.reject("INVALID_ARGUMENT", f"round {rnd.spec.index} has no more steps", "header.step")
            rnd.pending.clear()
        for cid in sorted(rnd.participants):
            while True:  # until a valid upload (a rejected one may be sent again), or the client is dropped
                with self.cond:
                    while cid in rnd.active and cid not in rnd.uploads:
                        if time.monotonic() - max(rnd.started, rnd.last_served.get(cid, 0.0)) > self.timeout:
                            self._drop(rnd, cid, f"no upload within client_timeout_s = {self.timeout:g} s")
                        else:
                            self.cond.wait(0.25)
                    call = rnd.uploads.pop(cid, None)
                if call is None:
                    break
                call.complete(self.server.handle_bytes(cid, call.payload), round=rnd.spec.index)
                if call.status is None:
                    with self.cond:
                        rnd.pushed.add(cid)
                        st, new = self.stats[cid], call.request.stats
                        st.sent_full += new.sent_full
                        st.sent_reuse += new.sent_reuse
                        st.bytes_saved += new.bytes_saved
                        st.tokens_forwarded += new.tokens_forwarded
                        st.cache_bytes = new.cache_bytes
                    break
        with self.cond:
            if len(rnd.pushed) < self.cfg.federation.min_clients:
                raise DeployError(f"round {rnd.spec.index}: {len(rnd.pushed)} clients finished, fewer than "
                                  f"federation.min_clients = {self.cfg.federation.min_clients}")
            rnd.aggregated = True
        self.server.aggregate()
        # adaptive cuts move between rounds, by simulation's rule on the same per-client training losses;
        # a moved client learns its new cut from its download (AdapterMsg.cut), which covers the new blocks
        old = list(self.fleet.cuts)
        new = self.fleet.adapt([sum(v) / len(v) if (v := rnd.losses.get(cid)) else float("nan")
                                for cid in range(self.cfg.federation.num_clients)])
        for cid, cut in enumerate(new):
            if cut != old[cid]:
                self.server.set_cut(cid, cut)
                log.info("round %d: client %d's cut moves %d -> %d", rnd.spec.index, cid, old[cid], cut)

    def _finish(self, rnd: _Round, t0: float) -> None:
        spec = rnd.spec
        if spec.ends_epoch:
            val_loss, val_ppl = self.server.evaluate(self.s.val, self.cfg.train.eval_batch_size, self.s.pad_id)
            reuse_record = self.reuse.end_epoch(spec.epoch, val_loss, self.counters.serde.by_stream().get("act_up", 0))
        with self.cond:  # release the downloads, wait for them (so the counters match simulation's)
            self.released = spec.index
            self.cond.notify_all()
            t = time.monotonic()
            while (rnd.pushed & rnd.active) - rnd.pulled and time.monotonic() - t < self.timeout:
                if not any(self.members.get(c) and self.members[c].alive for c in (rnd.pushed & rnd.active) - rnd.pulled):
                    break
                self.cond.wait(0.25)
        self.log.write("round", round=spec.index + 1, epoch=spec.epoch, clients=sorted(rnd.pushed),
                       dropped=sorted(rnd.dropped), **self.counters.serde.snapshot())
        log.info("round %d done: %d uploads, dropped %s", spec.index, len(rnd.pushed), sorted(rnd.dropped) or "none")
        if spec.ends_epoch:
            self.log.write("eval", epoch=spec.epoch, val_loss=val_loss, val_ppl=val_ppl, **self.counters.serde.snapshot(),
                           wall_s=self.wall_before + time.perf_counter() - t0)
            self.log.write("reuse", **reuse_record)
            log.info("epoch %d: val loss %.4f (ppl %.2f)", spec.epoch, val_loss, val_ppl)
            self.val_losses.append(val_loss)
            self.train_losses.append(sum(self.losses) / len(self.losses) if self.losses else float("nan"))
            self.s.bank.model.save_pretrained(str(self.out / "adapter"), selected_adapters=[GLOBAL])
        self._save_checkpoint(t0)

    def _validate(self, epoch: int, t0: float) -> float:
        loss, ppl = self.server.evaluate(self.s.val, self.cfg.train.eval_batch_size, self.s.pad_id)
        self.log.write("eval", epoch=epoch, val_loss=loss, val_ppl=ppl, **self.counters.serde.snapshot(),
                       wall_s=self.wall_before + time.perf_counter() - t0)
        return loss

    # ---- helpers (callers hold self.cond where state is shared) ----------------------------------
    def _drop(self, rnd: _Round, cid: int, reason: str) -> None:
        if cid not in rnd.active:
            return
        rnd.dropped[cid] = reason
        rnd.remaining[cid].clear()
        for call in [getattr(rnd.pending.pop(cid, None), "call", None), rnd.uploads.pop(cid, None),
                     getattr(rnd.grad_up.pop(cid, None), "call", None)]:
            if call is not None:
                call.reject(DROPPED, f"dropped from round {rnd.spec.index}: {reason}; join again", "round")
        if cid in self.members:
            self.members[cid].alive = False
        self.drops.append({"round": rnd.spec.index, "client": cid, "reason": reason})
        log.warning("dropped client %d from round %d: %s", cid, rnd.spec.index, reason)
        self.cond.notify_all()

    def _estimate(self, what: str, cid: int, value: float, alpha: float = 0.3) -> None:
        old = self.est[what].get(cid)
        self.est[what][cid] = value if old is None else (1 - alpha) * old + alpha * value

    def _job(self, cid: int, arrival: float) -> Job:
        """The schedule's view of a request: arrival (measured, or the client's forward time when planning
        ahead), service (measured on the server), tail (the client's reported backward), seconds."""
        return Job(cid, max(arrival, 0.0), self.est["service"].get(cid, 0.0), self.est["tail"].get(cid, 0.0))

    # ---- checkpoint / resume ------------------------------------------------------------------------
    def _server_banks(self) -> dict:
        """Every adapter set the server trains, with the bank holding it (one base, or a copy per client)."""
        srv, banks = self.server, {}
        for cid in sorted(srv.cuts):
            banks.setdefault(srv.body_adapter(cid), srv.views[cid][1] if hasattr(srv, "views") else self.s.bank)
        return banks

    def _save_checkpoint(self, t0: float) -> None:
        srv, banks = self.server, self._server_banks()
        state = {
            "version": 2, "next_round": self.next_round, "session": self.session,
            "global": srv.global_state, "server_round": srv.round,
            "cuts": dict(srv.cuts), "cuts_by_round": self.fleet.history,
            "adapters": {n: bank.state(n) for n, bank in banks.items()},
            "optimizers": {n: srv.optimizers[n].state_dict() for n in banks},
            "losses": self.losses, "val_losses": self.val_losses, "train_losses": self.train_losses,
            "init_loss": self.init_loss, "drops": self.drops, "resumed_at": self.resumed_at,
            "wall_s": self.wall_before + time.perf_counter() - t0,
            "stats": {cid: dict(vars(st)) for cid, st in self.stats.items()},
            "reuse": {"threshold": self.reuse.threshold, "by_epoch": self.reuse.by_epoch,
                      "marks": [self.reuse._full, self.reuse._reuse, self.reuse._saved, self.reuse._act]},
            "counters": {name: [[s, d, n, getattr(self.counters, name).messages[(s, d)]]
                                for (s, d), n in getattr(self.counters, name).by_stream_dir.items()]
                         for name in ("serde", "wire")},
            "grpc_bytes": dict(self.counters.grpc),
            "metrics_bytes": (self.out / "metrics.jsonl").stat().st_size,
        }
        tmp = self.out / f"{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out / CHECKPOINT)

    def _load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise UserError("no checkpoint to resume from (the run had not started training)", where=str(path))
        st = torch.load(path, weights_only=True)
        srv, bank = self.server, self.s.bank
        srv.global_state = dict(st["global"])
        bank.load(GLOBAL, srv.global_state)
        for cid, cut in st.get("cuts", {}).items():  # before the adapters: a cut decides which blocks the server holds
            srv.set_cut(int(cid), cut)
        self.fleet.cuts = [srv.cuts[c] for c in sorted(srv.cuts)]
        self.fleet.history = st.get("cuts_by_round", [list(self.fleet.cuts)])
        banks = self._server_banks()
        for name, state in st["adapters"].items():
            banks[name].load(name, state)
            srv.optimizers[name].load_state_dict(st["optimizers"][name])
        srv.round, self.next_round = st["server_round"], st["next_round"]
        self.losses, self.val_losses, self.train_losses = st["losses"], st["val_losses"], st["train_losses"]
        self.init_loss, self.drops = st["init_loss"], st["drops"]
        self.resumed_at = [*st["resumed_at"], self.next_round]
        self.wall_before = st["wall_s"]
        for cid, values in st["stats"].items():
            vars(self.stats[int(cid)]).update(values)
        self.reuse.threshold, self.reuse.by_epoch = st["reuse"]["threshold"], st["reuse"]["by_epoch"]
        self.reuse._full, self.reuse._reuse, self.reuse._saved, self.reuse._act = st["reuse"]["marks"]
        for name, rows in st["counters"].items():
            counter = getattr(self.counters, name)
            for s, d, n, m in rows:
                counter.by_stream_dir[(s, d)], counter.messages[(s, d)] = n, m
        self.counters.grpc.update(st["grpc_bytes"])
        with open(self.out / "metrics.jsonl", "r+b") as fh:  # forget what the lost round logged
            fh.truncate(st["metrics_bytes"])
        if self.cfg.compression.temporal.enabled:
            log.warning("resuming with temporal reuse: its caches restart empty, so the result is correct but "
                        "not bit-identical to an uninterrupted run")
        log.info("resuming %s at round %d of %d", self.out, self.next_round, len(self.plan))

    # ---- outputs ------------------------------------------------------------------------------------
    def _reuse_by_stream(self) -> dict[str, float]:
        """ReuseControl.by_stream with act_up counted from the clients' reported uploads."""
        counts = dict(self.server.reuse_by_stream())
        counts["act_up"] = (sum(st.sent_full for st in self.stats.values()),
                            sum(st.sent_reuse for st in self.stats.values()))
        return {k: r / max(f + r, 1) for k, (f, r) in sorted(counts.items())}

    def _summary(self, t0: float) -> dict:
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
            "reuse_ratio_by_stream": self._reuse_by_stream(),
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
            "dropped": self.drops, "resumed_at_rounds": self.resumed_at,
        }


# ---- client side --------------------------------------------------------------------------------
class DeployError(Exception):
    """Ends a client or server process with ``exit_code`` and a one-line message."""

    exit_code = 4


class AuthFailure(DeployError):
    exit_code = 3


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


COUNTERS = ("tokens_forwarded", "sent_full", "sent_reuse", "bytes_saved")


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
        self.last_pushed = dict.fromkeys(COUNTERS, 0)
        self._stop = threading.Event()
        self._batches: dict[int, list] = {}
        self._fired: set[str] = set()

    def connect(self) -> None:
        """Fetch the run config from the server and prepare model, data and SplitClient."""
        try:
            self._prepare(self._retry(self.conn.hello))
        except AuthRefused as err:
            raise AuthFailure(f"the server refused client {self.cid}: {err}") from None

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
                    if j.finished or self._enter(j.start_round, j.threshold):
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
                "grpc_message_bytes": dict(self.conn.grpc_bytes)}

    def _retry(self, fn):
        """Call ``fn`` until the server answers (it may not be up yet, or be restarting)."""
        deadline, delay = time.monotonic() + self.opts.reconnect_s, 0.1
        while True:
            try:
                return fn()
            except Disconnected as err:
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
        with PREPARE_LOCK:
            s = prepare(cfg)
            if partition_digest(s, self.cid) != hello.partition_digest:
                raise UserError("this client's data gives a different partition than the server's (it needs the "
                                "same dataset, config and seed)", where=self.opts.data or "data.dataset")
            self.sc = make_client(s, self.cid, client_cuts(s)[self.cid], self.channel)
        self.cfg, self.s = cfg, s
        self.plan = round_plan(cfg.train.epochs, max(batches_per_client(s)), cfg.federation.aggregate_every)

    def _counters(self) -> dict:
        return {k: int(getattr(self.sc, k, 0)) for k in COUNTERS}

    def _enter(self, start: int, threshold: float) -> bool:
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
            if start == 0:
                sc.bank.load(sc.adapter, sc.bank.state(GLOBAL, range(sc.cut)))
            else:
                sc.pull_adapters(start - 1)
                threshold = self.channel.last_pull.threshold
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
        self.channel.stats = lambda: {**{k: now[k] - self.last_pushed[k] for k in COUNTERS},
                                      "cache_bytes": int(sc.cache_bytes)}
        sc.push_adapters(r)
        self.pushed, self.last_pushed = True, now
        sc.pull_adapters(r)
        self.threshold = self.channel.last_pull.threshold
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
