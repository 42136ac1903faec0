"""The rounds loop of ``splitcom server``: begin a round, serve the clients' steps in the order of the
schedule, collect uploads, aggregate, move adaptive cuts, evaluate, checkpoint."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from splitcom.config import Config, dump_config
from splitcom.deploy.coordinator import ClientStats, Coordination, Member, Pending, RoundState
from splitcom.deploy.outputs import load_checkpoint, save_checkpoint, summary
from splitcom.deploy.plan import (
    PREPARE_LOCK,
    DeployError,
    RoundSpec,
    check_deployable,
    fault,
    log,
    round_plan,
)
from splitcom.federation.reuse import ReuseControl
from splitcom.federation.setup import batches_per_client, make_server, prepare
from splitcom.fleet.fleet import Fleet
from splitcom.fleet.schedule import Job, make_schedule
from splitcom.models.adapters import GLOBAL
from splitcom.protocol import serde
from splitcom.protocol.messages import AdapterMsg, Stream
from splitcom.runlog import RunLog, drop_kept, keep_checkpoint, write_json
from splitcom.transport.grpc_server import (
    TENSOR,
    Counters,
    SplitComService,
    loss_of,
    start_server,
)
from splitcom.transport.security import TokenAuth


class ServerDriver(Coordination):
    """The rounds loop of the server process; also the ``Coordinator`` behind grpc_server."""

    def __init__(self, cfg: Config, out: str | Path, resume: bool = False):
        check_deployable(cfg)
        self.cfg, self.out, fed = cfg, Path(out), cfg.federation
        self.out.mkdir(parents=True, exist_ok=True)
        with PREPARE_LOCK:
            self.s = prepare(cfg)
        # each client's cut: fixed, memory_fit (beside its stream state), or moved between rounds (adaptive)
        self.fleet = Fleet.of(self.s)
        self.server = make_server(self.s, dict(enumerate(self.fleet.cuts)),
                                  str(self.out / "cache") if cfg.compression.temporal.store == "disk" else None)
        self.batches = batches_per_client(self.s)
        self.plan = round_plan(cfg.train.epochs, max(self.batches), fed.aggregate_every)
        self.policy = make_schedule(fed.schedule, cfg.train.seed)
        self.timeout, self.session = fed.client_timeout_s, uuid.uuid4().hex[:12]
        self.counters = Counters()
        self.stats = {cid: ClientStats() for cid in range(fed.num_clients)}
        self.reuse = ReuseControl(cfg.compression.temporal, list(self.stats.values()), self.s.split.hidden_size,
                                  cfg.train.epochs, cfg.train.seed, self.server)
        self.max_message_bytes = self._message_limit()
        self.step_streams = frozenset({Stream.act_up} | ({Stream.grad_up} if self.server.ushape else set()))
        self.local = cfg.federation.mode == "fl"  # federated LoRA: clients train alone, no step traffic
        self.cond = threading.Condition()
        self.members: dict[int, Member] = {}
        self.current: RoundState | None = None
        self.phase, self.failed = "waiting_for_clients", None
        self.losses: list[float] = []
        self.val_losses: list[float] = []
        self.train_losses: list[float] = []
        self.init_loss: float | None = None
        self.drops: list[dict] = []
        self.resumed_at: list[int] = []
        self.turns_served, self.uploads_taken, self.wall_before, self.join_timeout_s = 0, 0, 0.0, None
        self.est = {k: {} for k in ("forward", "service", "tail")}
        self.next_round, self.metrics_bytes, self.pending_replay = 0, None, None  # (load_checkpoint sets them)
        if resume:
            load_checkpoint(self)
        else:
            (self.out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
            drop_kept(self.out)
        self.released = self.next_round - 1  # pulls for rounds <= released are answered
        self.log = RunLog(self.out / "metrics.jsonl", keep_bytes=self.metrics_bytes, replay=self.pending_replay)

    def _message_limit(self) -> int:
        """Twice the largest legitimate message of this run (fp32 activations of a full batch, the
        whole adapter), plus slack: anything larger is refused before it is parsed."""
        cfg, h = self.cfg, self.s.split.hidden_size
        act = serde.tensor_msg_bytes([cfg.data.max_length] * cfg.train.batch_size, h)
        adapter = len(serde.encode(AdapterMsg(Stream.adapters_up, 0, 0, 1.0, self.server.global_state)))
        return 2 * max(act, adapter) + (64 << 10)

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
            save_checkpoint(self, t0)
        for spec in self.plan[self.next_round:]:
            rnd = self._begin(spec)
            if spec.first_step == 0:
                self.reuse.begin_epoch(self.counters.serde.by_stream())
                self.losses = []
            if not self.local:  # (fl: the clients train the round on their own; their uploads end it)
                self._train(rnd)
            self._collect_uploads(rnd)
            self._finish(rnd, t0)
        with self.cond:
            self.phase = "finished"
            self.cond.notify_all()
        self.log.close()
        result = summary(self, t0)
        write_json(self.out / "summary.json", result)
        return result

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

    def _begin(self, spec: RoundSpec) -> RoundState:
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
            self.current = rnd = RoundState(spec, parts, remaining)
            rnd.bytes_at_start = (self.counters.serde.up, self.counters.serde.down)
            self.next_round, self.phase = spec.index + 1, "training"
            self.cond.notify_all()
        log.info("round %d (epoch %d, steps %d-%d): clients %s", spec.index, spec.epoch, spec.first_step,
                 spec.end_step - 1, sorted(parts))
        return rnd

    def _train(self, rnd: RoundState) -> None:
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

    def _await(self, rnd: RoundState, cids: list[int], g: int, many: bool = False):
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

    def _serve(self, rnd: RoundState, w: Pending, step: int) -> None:
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

    def _collect_uploads(self, rnd: RoundState) -> None:
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
                        self.stats[cid].add(call.request.stats)
                        if self.local:
                            rnd.losses[cid] = list(call.request.stats.losses)
                    self.uploads_taken += 1
                    if fault("SERVER_EXIT_AFTER_UPLOADS") == self.uploads_taken:
                        log.error("fault injection: server exits after %d uploads", self.uploads_taken)
                        os._exit(17)
                    break
        with self.cond:
            if len(rnd.pushed) < self.cfg.federation.min_clients:
                raise DeployError(f"round {rnd.spec.index}: {len(rnd.pushed)} clients finished, fewer than "
                                  f"federation.min_clients = {self.cfg.federation.min_clients}")
            rnd.aggregated = True
        if self.local:
            self._log_local_steps(rnd)
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

    def _log_local_steps(self, rnd: RoundState) -> None:
        """Federated LoRA: the steps' losses the clients reported with their uploads, logged as simulation logs
        its round-robin steps (step by step, clients in order; the byte counters as they stood during them)."""
        spec, by = rnd.spec, rnd.losses
        for i, step in enumerate(range(spec.first_step, spec.end_step)):
            for cid in sorted(by):
                if i < len(by[cid]):
                    self.losses.append(by[cid][i])
                    if spec.global_step(step) % self.cfg.logging.log_every == 0:
                        self.log.write("step", epoch=spec.epoch, step=step, client=cid, loss=by[cid][i],
                                       bytes_up=rnd.bytes_at_start[0], bytes_down=rnd.bytes_at_start[1])

    def _finish(self, rnd: RoundState, t0: float) -> None:
        spec = rnd.spec
        if spec.ends_epoch:
            val_loss, val_ppl = self.server.evaluate(self.s.val, self.cfg.train.eval_batch_size, self.s.pad_id)
            reuse_record = self.reuse.end_epoch(spec.epoch, val_loss, self.counters.serde.by_stream())
        with self.cond:  # release the downloads, wait for them (so the counters match simulation's)
            self.released = spec.index
            self.cond.notify_all()
            t = time.monotonic()
            while (rnd.pushed & rnd.active) - rnd.pulled and time.monotonic() - t < self.timeout:
                if not any(self.members.get(c) and self.members[c].alive for c in (rnd.pushed & rnd.active) - rnd.pulled):
                    break
                self.cond.wait(0.25)
        # the round's events wait for its checkpoint (RunLog.defer): a crash between them never leaves
        # metrics.jsonl claiming a round that --resume cannot find
        self.log.defer("round", round=spec.index + 1, epoch=spec.epoch, clients=sorted(rnd.pushed),
                       dropped=sorted(rnd.dropped), **self.counters.serde.snapshot())
        log.info("round %d done: %d uploads, dropped %s", spec.index, len(rnd.pushed), sorted(rnd.dropped) or "none")
        if spec.ends_epoch:
            self.log.defer("eval", epoch=spec.epoch, val_loss=val_loss, val_ppl=val_ppl, **self.counters.serde.snapshot(),
                           wall_s=self.wall_before + time.perf_counter() - t0)
            if not self.local:  # (simulation keeps no reuse record for fl either)
                self.log.defer("reuse", **reuse_record)
            log.info("epoch %d: val loss %.4f (ppl %.2f)", spec.epoch, val_loss, val_ppl)
            self.val_losses.append(val_loss)
            self.train_losses.append(sum(self.losses) / len(self.losses) if self.losses else float("nan"))
            self.s.bank.model.save_pretrained(str(self.out / "adapter"), selected_adapters=[GLOBAL])
        save_checkpoint(self, t0)
        if spec.ends_epoch:
            keep_checkpoint(self.out, spec.epoch, self.cfg.logging.keep_epochs)
        self.log.commit()

    def _validate(self, epoch: int, t0: float) -> float:
        loss, ppl = self.server.evaluate(self.s.val, self.cfg.train.eval_batch_size, self.s.pad_id)
        self.log.write("eval", epoch=epoch, val_loss=loss, val_ppl=ppl, **self.counters.serde.snapshot(),
                       wall_s=self.wall_before + time.perf_counter() - t0)
        return loss

    def _estimate(self, what: str, cid: int, value: float, alpha: float = 0.3) -> None:
        old = self.est[what].get(cid)
        self.est[what][cid] = value if old is None else (1 - alpha) * old + alpha * value

    def _job(self, cid: int, arrival: float) -> Job:
        """The schedule's view of a request: arrival (measured, or the client's forward time when planning
        ahead), service (measured on the server), tail (the client's reported backward), seconds."""
        return Job(cid, max(arrival, 0.0), self.est["service"].get(cid, 0.0), self.est["tail"].get(cid, 0.0))

