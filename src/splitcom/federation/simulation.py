"""``run(cfg)``: the rounds loop on one machine. Clients step in turn per batch over the in-process
transport (same serde and byte counts as gRPC); adapters are aggregated every round; the global
adapter is validated every epoch. Writes OUT/config.yaml, metrics.jsonl, summary.json, adapter/, and
OUT/checkpoint.pt after every epoch, from which ``run(..., resume=True)`` goes on after a crash: a
finished epoch is never lost. The checkpoint carries both ends' stream caches (reuse summaries, the held
tensors and DELTA mirrors, prefix registries), the adapter mirrors and the controllers' state, so a resumed
run ends exactly where an uninterrupted one does (DDPG aside: its agent is warm-started from its saved
weights, not its replay buffer)."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from splitcom.config import Config, config_diff, dump_config, lengthening_refusal, load_config
from splitcom.errors import UserError
from splitcom.evaluate.perplexity import evaluate_loss
from splitcom.federation.centralized import CentralizedTrainer
from splitcom.federation.client import SplitClient
from splitcom.federation.reuse import ReuseControl
from splitcom.federation.server import SplitServer
from splitcom.federation.setup import Setup, make_client, make_server, prepare, schedule_of, tail_layers
from splitcom.fleet.fleet import Fleet
from splitcom.models.adapters import GLOBAL
from splitcom.runlog import (
    CHECKPOINT,
    RunLog,
    atomic_save,
    drop_kept,
    keep_checkpoint,
    peak_rss_bytes,
    write_json,
)
from splitcom.transport.counters import ByteCounter
from splitcom.transport.inprocess import InProcessChannel


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


def build_sfl(s: Setup, counter: ByteCounter, cache_dir: str | None = None,
              cuts: dict[int, int] | None = None) -> tuple[SplitServer, list[SplitClient]]:
    cfg = s.cfg
    first = s.split.num_layers if cfg.federation.mode == "fl" else cfg.split.cut_layer  # fl: every block
    cuts = cuts or {cid: first for cid in range(cfg.federation.num_clients)}
    server = make_server(s, cuts, cache_dir, weights={cid: float(len(s.partitions[cid])) for cid in cuts})
    clients = [make_client(s, cid, cuts[cid], InProcessChannel(cid, server, counter)) for cid in cuts]
    return server, clients


DDPG_CHECKPOINT = "checkpoint-ddpg.zip"
DDPG_AGENTS = "checkpoint-ddpg*.zip"  # and checkpoint-ddpg-STREAM.zip where several streams have an agent
log_ = logging.getLogger("splitcom.run")


def load_checkpoint(out: Path, cfg: Config) -> dict:
    path = out / CHECKPOINT
    if not path.is_file():
        raise UserError("no checkpoint to resume from (no epoch had finished)", where=str(path))
    diff = config_diff(load_config(out / "config.yaml"), cfg, {"logging"}) if (out / "config.yaml").is_file() else []
    longer = diff == ["train.epochs"]  # more epochs: a finished run trains on (see below)
    if diff and not longer:
        raise UserError(f"the config differs from the run's own config.yaml in {', '.join(diff)} (resume takes "
                        "it as it is: drop those --set; only train.epochs may grow)", where=str(out / "config.yaml"))
    ckpt = torch.load(path, weights_only=True)
    if longer:
        if cfg.train.epochs < ckpt["epoch"]:
            raise UserError(f"the run has already finished {ckpt['epoch']} epochs; train.epochs "
                            f"{cfg.train.epochs} would undo some", where="train.epochs")
        if why := lengthening_refusal(cfg):  # N epochs then M more must end where an N + M epoch run ends
            raise UserError(f"{why}: its run cannot be lengthened exactly; start a longer run", where="train.epochs")
    c = cfg.compression
    if cfg.federation.mode == "sfl" and (c.temporal.enabled or c.prefix):  # checked before anything is touched
        states = [ckpt.get("server", {}), *ckpt.get("clients", [])]
        if any("caches" not in st for st in states):
            raise UserError("has no stream caches (reuse summaries, held tensors, prefixes), which this config "
                            "needs to resume exactly: it was written by an older splitcom; start the run again "
                            "(--force) or resume it with that version", where=str(path))
    return ckpt


def run(cfg: Config, out_dir: str | Path, progress: bool = True, resume: bool = False) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(out, cfg) if resume else None
    if ckpt is None:
        drop_kept(out)
    if ckpt is None or load_config(out / "config.yaml").train.epochs != cfg.train.epochs:  # new, or lengthened
        (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        # a lengthened run is unfinished again: the shorter run's summary.json must not pass for this one's
        # (a crash before the new last epoch would otherwise leave the old figures beside the new config)
        (out / "summary.json").unlink(missing_ok=True)
    t0 = time.perf_counter() - (ckpt["wall_s"] if ckpt else 0.0)
    s = prepare(cfg)
    log = RunLog(out / "metrics.jsonl", keep_bytes=ckpt["metrics_bytes"] if ckpt else None,
                 replay=ckpt.get("pending") if ckpt else None,
                 tensorboard=out / "tensorboard" if cfg.logging.tensorboard else None)
    counter = ByteCounter()
    sfl = cfg.federation.mode == "sfl"
    federated = sfl or cfg.federation.mode == "fl"  # fl: SFL's clients with the whole model, adapters alone travel
    if federated:
        fleet = Fleet.of(s)  # devices, per-client cuts (fl: every block), simulated clock
        server, workers = build_sfl(s, counter, str(out / "cache") if cfg.compression.temporal.store == "disk"
                                    else None, dict(enumerate(fleet.cuts)))
        for c in workers:
            c.join()
        temporal = cfg.compression.temporal
        if ckpt is not None and temporal.enabled and temporal.controller == "ddpg":  # warm start
            temporal = temporal.model_copy(update={"ddpg": temporal.ddpg.model_copy(
                update={"load": str(out / DDPG_CHECKPOINT)})})
        reuse = ReuseControl(temporal, workers, s.split.hidden_size, cfg.train.epochs, cfg.train.seed, server) \
            if sfl else None
    else:
        workers = [CentralizedTrainer(s.split.model, s.bank, s.train, lr=cfg.train.lr,
                                      weight_decay=cfg.train.weight_decay, batch_size=cfg.train.batch_size,
                                      pad_id=s.pad_id, seed=cfg.train.seed, device=s.device,
                                      schedule=schedule_of(s))]

    def validate(epoch: int) -> tuple[float, float]:
        """Val loss of the global adapter; the epoch's `eval` event waits for its checkpoint (RunLog.defer)."""
        loss, ppl = evaluate_loss(s.split, s.bank, s.val, cfg.train.eval_batch_size, s.pad_id, s.device)
        log.defer("eval", epoch=epoch, val_loss=loss, val_ppl=ppl, **counter.snapshot(),
                  wall_s=time.perf_counter() - t0, simulated_s=fleet.clock.now if federated else None)
        return loss, ppl

    rounds = 0
    round_losses: dict[int, list[float]] = {}

    def aggregate(epoch: int) -> None:
        nonlocal rounds
        if federated:
            for c in workers:
                c.push_adapters(rounds)
            server.aggregate()
            old = list(fleet.cuts)
            new = fleet.adapt([sum(v) / len(v) if (v := round_losses.get(c.cid)) else float("nan")
                               for c in workers])
            moved = [c.cid for c in workers if new[c.cid] != old[c.cid]]
            for cid in moved:  # handover at the round boundary: every copy equals the global adapter now
                server.set_cut(cid, new[cid])
            for c in workers:  # a moved client takes its new cut from the download, which covers the new blocks
                c.pull_adapters(rounds)
            traffic = {c.cid: c.channel.take_bytes() for c in workers}
            fleet.aggregation({k: v[0] for k, v in traffic.items()}, {k: v[1] for k, v in traffic.items()})
            round_losses.clear()
        rounds += 1
        log.write("round", round=rounds, epoch=epoch, **counter.snapshot(),
                  **({"cuts": list(fleet.cuts), "simulated_s": fleet.clock.now,  # the exchange, per client:
                      "adapter_bytes": [list(traffic[c.cid]) for c in workers]} if federated else {}))

    def checkpoint(epoch: int) -> None:
        state = {"version": 1, "epoch": epoch, "rounds": rounds, "global_step": global_step,
                 "init_loss": init_loss, "val_losses": val_losses, "train_losses": train_losses,
                 "wall_s": time.perf_counter() - t0, "metrics_bytes": log.size, "pending": log.pending,
                 "counter": counter.state_dict(), "rng": torch.get_rng_state()}
        if federated:
            state.update(server=server.state_dict(caches=True), clients=[c.state_dict(caches=True) for c in workers],
                         simulated_by_epoch=simulated_by_epoch, fleet=fleet.state_dict())
        if sfl:
            state.update(reuse=reuse.state_dict())
            reuse.save_agent(out / DDPG_CHECKPOINT)
        else:
            state.update(central={"adapter": s.bank.state(GLOBAL), "optimizer": workers[0].optimizer.state_dict(),
                                  "tokens_forwarded": workers[0].tokens_forwarded})
        atomic_save(state, out / CHECKPOINT)
        keep_checkpoint(out, epoch, cfg.logging.keep_epochs, beside=DDPG_AGENTS)
        if os.environ.get("SPLITCOM_FAULT_RUN_EXIT_BEFORE_EVENTS") == str(epoch):
            raise RuntimeError(f"fault injection: the run stops between epoch {epoch}'s checkpoint and its events")
        log.commit()
        if os.environ.get("SPLITCOM_FAULT_RUN_EXIT_AFTER_EPOCHS") == str(epoch):
            raise RuntimeError(f"fault injection: the run stops after epoch {epoch}")

    simulated_by_epoch: list[float] = []
    val_losses, train_losses = [], []
    every = cfg.federation.aggregate_every
    plans = [len(w.epoch_batches(1)) for w in workers]
    global_step, first_epoch = 0, 1
    if ckpt is None:
        init_loss, _ = validate(0)
        log.commit()
    else:  # go on from the last finished epoch
        first_epoch, rounds, global_step = ckpt["epoch"] + 1, ckpt["rounds"], ckpt["global_step"]
        init_loss, val_losses, train_losses = ckpt["init_loss"], ckpt["val_losses"], ckpt["train_losses"]
        counter.load_state_dict(ckpt["counter"])
        torch.set_rng_state(ckpt["rng"])
        if federated:
            server.load_state_dict(ckpt["server"], where=str(out / CHECKPOINT))
            for c, st in zip(workers, ckpt["clients"], strict=True):
                c.load_state_dict(st, where=str(out / CHECKPOINT))
                c.channel.take_bytes()  # the join above is not part of the interrupted run's clock
            if sfl:
                reuse.load_state_dict(ckpt["reuse"])
            simulated_by_epoch = ckpt["simulated_by_epoch"]
            fleet.load_state_dict(ckpt["fleet"])
        else:
            s.bank.load(GLOBAL, ckpt["central"]["adapter"])
            workers[0].optimizer.load_state_dict(ckpt["central"]["optimizer"])
            workers[0].tokens_forwarded = ckpt["central"]["tokens_forwarded"]
        log_.info("resuming %s after epoch %d of %d", out, ckpt["epoch"], cfg.train.epochs)
    # the live bar only where someone watches a terminal; elsewhere one plain line per epoch (below)
    with _progress(progress and cfg.logging.progress and sys.stderr.isatty()) as bar:
        task = bar.add_task("starting", total=cfg.train.epochs * sum(plans),
                            completed=(first_epoch - 1) * sum(plans))
        for epoch in range(first_epoch, cfg.train.epochs + 1):
            if sfl:
                reuse.begin_epoch(counter.by_stream())
            batches = [w.epoch_batches(epoch) for w in workers]
            losses, since_round = [], 0
            for step in range(max(len(b) for b in batches)):
                jobs = []
                for w, plan in zip(workers, batches, strict=True):
                    if step >= len(plan):
                        continue  # this client has fewer samples; it waits for the round
                    loss = w.train_step(plan[step], global_step)
                    losses.append(loss)
                    cid = getattr(w, "cid", 0)
                    round_losses.setdefault(cid, []).append(loss)
                    if federated:
                        jobs.append(fleet.job(cid, plan[step], *w.channel.take_bytes()))
                    bar.update(task, advance=1, description=f"epoch {epoch}/{cfg.train.epochs} client {cid} "
                               f"step {step + 1}/{len(plan)} loss {loss:.3f} up {counter.up / 1e6:.2f} MB "
                               f"down {counter.down / 1e6:.2f} MB")
                    if global_step % cfg.logging.log_every == 0:
                        log.write("step", epoch=epoch, step=step, client=cid, loss=loss,
                                  bytes_up=counter.up, bytes_down=counter.down)
                if federated:
                    fleet.step(jobs)  # clients in parallel, the server one request at a time (fl: no server)
                global_step += 1
                since_round += 1
                if isinstance(every, int) and since_round >= every:
                    aggregate(epoch)
                    since_round = 0
            if every == "epoch" or since_round:
                aggregate(epoch)
            bar.update(task, description=f"epoch {epoch}/{cfg.train.epochs}: evaluating on {len(s.val)} dev samples")
            val_loss, val_ppl = validate(epoch)
            if federated:
                simulated_by_epoch.append(fleet.clock.now - sum(simulated_by_epoch))
            if sfl:
                log.defer("reuse", **reuse.end_epoch(epoch, val_loss, counter.by_stream()))
            val_losses.append(val_loss)
            train_losses.append(sum(losses) / len(losses))
            s.bank.model.save_pretrained(str(out / "adapter"), selected_adapters=[GLOBAL])
            checkpoint(epoch)
            line = (f"epoch {epoch}/{cfg.train.epochs}: train loss {train_losses[-1]:.4f}, val loss {val_loss:.4f} "
                    f"(ppl {val_ppl:.2f}), up {counter.up / 1e6:.2f} MB, down {counter.down / 1e6:.2f} MB"
                    + (f", reuse {reuse.by_epoch[-1]['reuse_ratio']:.3f}" if sfl else "")
                    + f", {time.perf_counter() - t0:.0f} s")
            if bar.disable:  # not a terminal (CI logs, nohup, a file): one plain line per epoch
                print(line, file=sys.stderr, flush=True)
            else:
                bar.console.print(line, highlight=False)
    log.close()
    temporal = {}
    if sfl:
        agent = reuse.save(out)
        temporal = {
            "reuse_ratio": reuse.reuse_ratio,
            "reuse_ratio_by_epoch": [r["reuse_ratio"] for r in reuse.by_epoch],
            "reuse_ratio_by_stream": reuse.by_stream(),
            "transfers_by_stream": reuse.transfers(),
            "threshold_by_epoch": [r["threshold"] if cfg.compression.temporal.enabled else None
                                   for r in reuse.by_epoch],
            **({"ddpg_agent": agent} if agent else {}),
        }
    if federated:
        temporal.update({
            "client_cache_bytes": sum(c.cache_bytes for c in workers),
            "server_cache_bytes": server.cache_bytes,
            "server_state_bytes": server.state_bytes()["total"],
            "server_state": server.state_bytes(),
            "client_memory_estimate_bytes": fleet.memory_estimates(),
            "simulated_s": fleet.clock.now,
            "simulated_s_by_epoch": simulated_by_epoch,
            "makespan_per_step_s": sum(fleet.clock.step_makespans) / max(len(fleet.clock.step_makespans), 1),
            "devices": [d.name for d in fleet.clock.devices],
            **({"schedule": cfg.federation.schedule, "cuts": list(fleet.cuts), "cuts_by_round": fleet.history}
               if sfl else {}),
        })
    summary = {
        "model": cfg.model.name,
        "mode": cfg.federation.mode,
        "num_clients": cfg.federation.num_clients if federated else 1,
        "epochs": cfg.train.epochs,
        "rounds": rounds,
        "split_mode": cfg.split.mode if sfl else None,
        "cut_layer": cfg.split.cut_layer if sfl else None,
        "tail_layers": tail_layers(cfg) if sfl else None,
        "num_layers": s.split.num_layers,
        "hidden_size": s.split.hidden_size,
        "train_samples": len(s.train),
        "client_samples": [len(p) for p in s.partitions],
        "train_tokens": sum(w.tokens_forwarded for w in workers),
        **counter.snapshot(),
        "initial_val_loss": init_loss,
        "val_loss": val_losses[-1],
        "val_ppl": math.exp(min(val_losses[-1], 50.0)),
        "val_loss_by_epoch": val_losses,
        "train_loss_by_epoch": train_losses,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_bytes": peak_rss_bytes(),
        **temporal,
    }
    write_json(out / "summary.json", summary)
    return summary
