"""Scale: peak RSS and seconds per round of a simulation against the number of clients; writes
bench/results/scale.md.

    .venv/bin/python bench/scale.py [--clients 10 100 1000] [--model smollm2-135m] [--per-client 1]

Each client count runs ``splitcom run`` (simulation, 1 epoch = 1 round, small per-client shards) in its
own subprocess, so the peak RSS is that run's alone. Per-client state is the client's adapter for its
blocks and the server's adapter for the others, each with its AdamW state (DESIGN 4.2); that is measured
on a one-client build of the same config, and the goal is that RSS grows, from the smallest count to N,
by less than that times the added clients, plus 10 %.

Seconds per round: from the initial validation to the end of round 1 (every client's steps, uploads,
FedAvg, downloads); model loading, validation and the checkpoint are not in it. The defaults (one sample
of at most 32 tokens per client) keep 10 + 100 + 1000 clients near 15 minutes on a 2-core CPU, where a
smollm2 step costs ~0.7 s; memory does not depend on them (the state is per client, not per sample).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def config(args, clients: int):
    from splitcom.config import build_config

    samples = args.per_client * clients
    return build_config({}, [
        f"model.name={args.model}", f"federation.num_clients={clients}", f"split.cut_layer={args.cut}",
        f"data.synthetic_size={max(1200, 2 * samples)}", f"data.max_train_samples={samples}",
        f"data.max_eval_samples={args.eval_samples}", f"data.max_length={args.max_length}",
        f"train.batch_size={args.batch_size}", "train.epochs=1", "logging.progress=false"])


def one(args) -> dict:
    """The run of one client count (in its own process): summary figures and the round's seconds."""
    import torch

    from splitcom.federation import simulation
    from splitcom.runlog import RunLog

    torch.set_num_threads(args.threads)
    stamps: list[tuple[str, float]] = []

    class TimedLog(RunLog):  # stamps each event as the rounds loop writes it
        def write(self, event: str, **fields) -> None:
            stamps.append((event, time.perf_counter()))
            super().write(event, **fields)

    simulation.RunLog = TimedLog
    out = Path(tempfile.mkdtemp(prefix=f"splitcom-scale{args.one}-"))
    try:
        summary = simulation.run(config(args, args.one), out, progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    start = next(t for e, t in stamps if e == "eval")  # the initial validation is written before round 1
    end = next(t for e, t in stamps if e == "round")
    return {"clients": args.one, "peak_rss": summary["peak_rss_bytes"], "round_s": end - start,
            "server_state_bytes": summary["server_state_bytes"], "client_samples": summary["client_samples"],
            "wall_s": summary["wall_s"], "val_loss": summary["val_loss"]}


def per_client_bytes(args) -> dict[str, int]:
    """Adapter + AdamW state of one client, both sides (client blocks and the server's blocks for it),
    measured on a one-client build after one step."""
    import torch

    from splitcom.federation.setup import prepare
    from splitcom.federation.simulation import build_sfl
    from splitcom.transport.counters import ByteCounter

    s = prepare(config(args, 1))
    server, (client,) = build_sfl(s, ByteCounter())
    client.train_step(client.epoch_batches(1)[0], 0)
    adapter = optimizer = 0
    for opt in [client.optimizer, *server.optimizers.values()]:
        for p in (p for g in opt.param_groups for p in g["params"]):
            adapter += p.numel() * p.element_size()
            optimizer += sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v))
    return {"adapter": adapter, "optimizer": optimizer, "total": adapter + optimizer}


def table(rows: list[dict], per_client: int) -> list[str]:
    base = rows[0]
    lines = [f"| clients | peak RSS MB | RSS growth vs {base['clients']} clients MB | adapter+optimizer x N MB | "
             "goal: growth <= 1.1 x adapter+optimizer x added clients | s / round | server_state_bytes MB |",
             "| ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        added = r["clients"] - base["clients"]
        growth = r["peak_rss"] - base["peak_rss"]
        budget = 1.1 * per_client * added
        ratio = growth / (per_client * added) if added else 0.0
        verdict = "-" if added == 0 else f"{'yes' if growth <= budget else 'NO'} ({ratio:.3f} x)"
        lines.append(f"| {r['clients']} | {r['peak_rss'] / MB:.0f} | {growth / MB:.0f} | "
                     f"{per_client * r['clients'] / MB:.0f} | {verdict} | {r['round_s']:.1f} | "
                     f"{r['server_state_bytes'] / MB:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-client", type=int, default=1, help="training samples per client")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: no spinning on a busy box)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per client count")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.md")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one client count, print JSON
    args = ap.parse_args()
    if args.one is not None:
        print("SCALE " + json.dumps(one(args)), flush=True)
        return
    rows, notes = [], []
    for n in sorted(args.clients):
        cmd = [sys.executable, __file__, "--one", str(n)] + [
            a for k, v in vars(args).items() if k not in ("clients", "out", "one", "timeout")
            for a in (f"--{k.replace('_', '-')}", str(v))]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        except subprocess.TimeoutExpired:
            notes.append(f"{n} clients: stopped after {args.timeout:g} s")
            print(notes[-1], flush=True)
            break
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE ")), None)
        if proc.returncode or line is None:
            notes.append(f"{n} clients: failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
            print(notes[-1], flush=True)
            break
        row = json.loads(line.removeprefix("SCALE "))
        assert len(row.pop("client_samples")) == n
        rows.append(row)
        print(f"{n} clients: peak RSS {row['peak_rss'] / MB:.0f} MB, {row['round_s']:.1f} s per round, "
              f"server state {row['server_state_bytes'] / MB:.0f} MB ({time.perf_counter() - t:.0f} s in all)",
              flush=True)
    per_client = per_client_bytes(args)
    head = [f"# Scale: {args.model}, {args.per_client} samples per client, max_length {args.max_length}, "
            f"batch {args.batch_size}, cut {args.cut}, 1 epoch (1 round)", "",
            f"Machine: {psutil.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB; torch threads {args.threads}. "
            f"Each client count in its own process (`bench/scale.py`).", "",
            f"Per-client state (client blocks + the server's blocks for it): adapter "
            f"{per_client['adapter'] / MB:.2f} MB + AdamW {per_client['optimizer'] / MB:.2f} MB = "
            f"{per_client['total'] / MB:.2f} MB.", ""]
    text = "\n".join(head + table(rows, per_client["total"]) + ([""] + notes if notes else [])) + "\n" if rows \
        else "\n".join(head + notes) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
