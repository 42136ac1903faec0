"""The clock of a finished run, replayed on another fleet: how long the same training (the same batches,
the same bytes each client sent and received in each step and round) would take on other devices and
links. Time to quality compares rows on a fleet they did not run on, without training them again.

The clock's inputs are all recoverable: each client's batches follow from the config (its partition and
the seeded order), each step's bytes from the run's ``step`` events (the byte counters after every step,
``logging.log_every: 1``) and each round's adapter exchange from its ``round`` event (``adapter_bytes`` by
client; a log written before that field: the round's total split evenly, since every client exchanges
adapters of the same shape and entropy coding changes their sizes by a few bytes). Replayed on the run's own devices it gives back the logged ``simulated_s`` (the test checks).
"""

from __future__ import annotations

from pathlib import Path

from splitcom.config import load_config
from splitcom.errors import UserError
from splitcom.federation.client import epoch_batches
from splitcom.runlog import read_metrics


def replay(out: str | Path, devices: str | list[str] | None = None, server_device: str | None = None) -> list[dict]:
    """Per finished epoch of the run in ``out``: ``{"epoch", "simulated_s", "val_ppl", "logged_s",
    "memory_estimate_bytes"}`` (the last: each client's device memory by the time model) on ``devices`` (a fleet name or list, as ``federation.devices``; None: the run's own)."""
    from splitcom.federation.setup import prepare
    from splitcom.fleet.fleet import Fleet

    out = Path(out)
    sets = [f"federation.devices={devices if isinstance(devices, str) else '[' + ','.join(devices) + ']'}"] \
        if devices else []
    sets += [f"federation.server_device={server_device}"] if server_device else []
    cfg = load_config(out / "config.yaml", sets)
    where = str(out / "metrics.jsonl")
    if cfg.federation.mode == "centralized":
        raise UserError("a centralized run has no devices or wire to replay", where=str(out / "config.yaml"))
    if cfg.federation.aggregate_every != "epoch" or cfg.logging.log_every != 1 or cfg.split.cut_policy == "adaptive":
        raise UserError("replay needs aggregate_every: epoch, logging.log_every: 1 and fixed cuts (the steps' bytes "
                        "and the cuts must be in the log)", where=str(out / "config.yaml"))
    events = read_metrics(out / "metrics.jsonl")
    steps = iter(e for e in events if e["event"] == "step")
    rounds = {e["epoch"]: e for e in events if e["event"] == "round"}
    evals = {e["epoch"]: e for e in events if e["event"] == "eval"}
    s = prepare(cfg)
    fleet = Fleet.of(s)
    t = cfg.train
    samples = [[s.train[i] for i in s.partitions[c]] for c in range(fleet.n)]
    # the clients' join messages count in their first step's traffic; the log has only their sum (the
    # counters at epoch 0's evaluation), split evenly (every join message has the same fields)
    joined = evals.get(0, {"bytes_up": 0, "bytes_down": 0})
    join = {c: (joined["bytes_up"] / fleet.n, joined["bytes_down"] / fleet.n) for c in range(fleet.n)}
    up, down = joined["bytes_up"], joined["bytes_down"]
    result = []
    for epoch in sorted(e for e in rounds if e in evals):
        plans = [epoch_batches(samples[c], epoch, c, t.seed, t.batch_size, s.pad_id) for c in range(fleet.n)]
        for step in range(max(len(p) for p in plans)):
            jobs = []
            for cid, plan in enumerate(plans):
                if step >= len(plan):
                    continue
                ev = next(steps, None)
                if ev is None or (ev["epoch"], ev["step"], ev["client"]) != (epoch, step, cid):
                    raise UserError(f"expected the step event of epoch {epoch}, step {step}, client {cid}, found "
                                    f"{ev and (ev['epoch'], ev['step'], ev['client'])}: the log does not match "
                                    "the config", where=where)
                ju, jd = join.pop(cid, (0, 0))
                jobs.append(fleet.job(cid, plan[step], ev["bytes_up"] - up + ju, ev["bytes_down"] - down + jd))
                up, down = ev["bytes_up"], ev["bytes_down"]
            fleet.step(jobs)
        r = rounds[epoch]
        if "adapter_bytes" in r:  # each client's exchange (runs logged before it: an even split of the total)
            fleet.aggregation({c: b[0] for c, b in enumerate(r["adapter_bytes"])},
                              {c: b[1] for c, b in enumerate(r["adapter_bytes"])})
        else:
            share_up, share_down = (r["bytes_up"] - up) / fleet.n, (r["bytes_down"] - down) / fleet.n
            fleet.aggregation({c: share_up for c in range(fleet.n)}, {c: share_down for c in range(fleet.n)})
        up, down = r["bytes_up"], r["bytes_down"]
        result.append({"epoch": epoch, "simulated_s": fleet.clock.now, "val_ppl": evals[epoch]["val_ppl"],
                       "logged_s": r.get("simulated_s"), "memory_estimate_bytes": fleet.memory_estimates()})
    return result


def time_to_quality(by_epoch: list[dict], target_ppl: float) -> float | None:
    """Simulated seconds at the end of the first epoch whose val ppl is at or below ``target_ppl``."""
    return next((e["simulated_s"] for e in by_epoch if e["val_ppl"] <= target_ppl), None)
