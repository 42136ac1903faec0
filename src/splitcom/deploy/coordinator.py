"""The server's side of the gRPC threads: the ``Coordinator`` entry points (join, step, push, pull,
heartbeat, streams) and the turn gate's shared state. ``ServerDriver`` (server.py) runs the rounds loop
on the same state; this half only answers what clients send."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from splitcom.compress.pipeline import TRANSFER_KEYS
from splitcom.config import STREAMS, dump_config
from splitcom.deploy.plan import RoundSpec, forget_summaries, log, partition_digest
from splitcom.protocol import serde
from splitcom.protocol.messages import Stream
from splitcom.transport.grpc_server import (
    DROPPED,
    Call,
    Rejected,
    adapter_weight,
)


@dataclass
class Member:
    start: int  # first round it takes part in
    alive: bool = True
    stream: object | None = None
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class Pending:
    call: Call
    labels: list[Call]
    gstep: int
    arrival: float


@dataclass
class RoundState:
    spec: RoundSpec
    participants: set[int]
    remaining: dict[int, deque]  # cid -> global steps still to serve
    pending: dict[int, Pending] = field(default_factory=dict)
    dropped: dict[int, str] = field(default_factory=dict)
    uploads: dict[int, Call] = field(default_factory=dict)  # waiting to be served
    # U-shape: a step is two exchanges (act_up -> act_down, grad_up -> grad_down); the turn stays with the
    # client between them, as in simulation's lockstep
    awaiting_grad: dict[int, int] = field(default_factory=dict)  # cid -> step whose grad_up the gate awaits
    grad_up: dict[int, Pending] = field(default_factory=dict)
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
class ClientStats:
    """What ReuseControl and the summary read from a client, accumulated from its uploads."""

    sent_full: int = 0
    sent_reuse: int = 0
    bytes_saved: int = 0
    tokens_forwarded: int = 0
    cache_bytes: int = 0
    threshold: float = 1.0
    transfers: dict[str, dict[str, int]] = field(default_factory=dict)  # by stream: Outgoing.counts()

    def add(self, new) -> None:
        """Fold in the counters of an upload (a pb.ClientStats: differences, cache bytes absolute)."""
        self.sent_full += new.sent_full
        self.sent_reuse += new.sent_reuse
        self.bytes_saved += new.bytes_saved
        self.tokens_forwarded += new.tokens_forwarded
        self.cache_bytes = new.cache_bytes
        for stream in sorted({key.rpartition(".")[0] for key in new.transfers} & set(STREAMS)):
            acc = self.transfers.setdefault(stream, {})
            for k in TRANSFER_KEYS:  # keyed "<stream>.<counter>"
                v = new.transfers.get(f"{stream}.{k}", 0)
                acc[k] = v if k == "cache_bytes" else acc.get(k, 0) + v

    def stream_counts(self) -> dict[str, dict[str, int]]:
        return self.transfers


class Coordination:
    """The ``Coordinator`` methods of ServerDriver (state: see ServerDriver.__init__)."""

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
            call.complete(reply, start_round=start, threshold=self.reuse.threshold,
                          thresholds=dict(self.reuse.thresholds), session=self.session,
                          finished=start >= len(self.plan))
            if call.status is not None:
                return
            if self.current is not None and cid in self.current.active and cid not in self.current.pushed:
                self._drop(self.current, cid, "it joined again (a new session)")
            forget_summaries(self.server.out[cid].values())
            self.members[cid] = Member(start)
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
        if call.header.stream == Stream.grad_up:  # (the transport admits grad_up in U-shape only)
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
            rnd.pending[cid] = Pending(call, labels, g, time.monotonic())
            self._estimate("forward", cid, call.request.forward_s)
            self._estimate("tail", cid, call.request.backward_s)
            self.cond.notify_all()
        self._wait_served(call)

    def _second_half(self, call: Call) -> None:
        """U-shape: hand the grad_up of the step being served to the gate that holds the turn."""
        cid, g = call.cid, call.header.step
        with self.cond:
            rnd = self.current
            if rnd is None or rnd.awaiting_grad.get(cid) != g:
                raise Rejected("INVALID_ARGUMENT", f"grad_up for step {g} of client {cid} without its act_up "
                               "being served", "header.step")
            rnd.grad_up[cid] = Pending(call, [], g, time.monotonic())
            self.cond.notify_all()
        self._wait_served(call)

    def _await_grad_up(self, rnd: RoundState, cid: int, g: int) -> Pending | None:
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
        self._wait_served(call)

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
        call.complete(self.server.handle_bytes(call.cid, call.payload), threshold=threshold,
                      thresholds=dict(self.reuse.thresholds), finished=finished)
        with self.cond:
            if self.current is not None and self.current.spec.index == r:
                self.current.pulled.add(call.cid)
            self.cond.notify_all()


    # ---- helpers (callers hold self.cond where state is shared) ----------------------------------
    def _wait_served(self, call: Call) -> None:
        """Block this gRPC thread until the rounds loop has answered ``call`` (or the run failed)."""
        while not call.done.wait(1.0):
            with self.cond:
                if self.failed:
                    raise Rejected("ABORTED", self.failed)

    def _drop(self, rnd: RoundState, cid: int, reason: str) -> None:
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

