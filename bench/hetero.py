"""Heterogeneous-fleet benchmarks; writes bench/results/hetero.md.

    .venv/bin/python bench/hetero.py [--clients 10] [--model smollm2-135m] [--steps 40]

(a) Server memory for N clients: one frozen base with per-client adapters against one server model
    copy per client (``per_client_copies``), both really allocated, after one training step of every
    client (so optimizer state exists). Measured state: parameters + buffers (shared storage counted
    once), optimizer state, caches; plus the process RSS growth.
(b) Makespan of the server schedule on the mixed10 fleet: per-step jobs from the time model with the
    token counts of real batches, every policy against fifo, and against exact where it runs (<= 9).
(c) Cut policies on real E2E data (../shared/data/e2e; skipped where absent): fixed against memory_fit
    against adaptive, each a full simulated run on the mixed10 fleet: simulated time and val ppl.

Each part writes its own fragment (hetero-a.md, ...) and hetero.md is their concatenation, so one part
can be rerun alone: ``--parts c``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import warnings
from pathlib import Path

import psutil

from splitcom.config import build_config, load_config
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.fleet.clock import SimClock
from splitcom.fleet.schedule import MAX_EXACT, make_schedule, simulate
from splitcom.transport.counters import ByteCounter

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e"


def memory(model: str, clients: int, mode: str) -> dict:
    rss0 = psutil.Process().memory_info().rss
    cfg = build_config({}, [f"model.name={model}", f"federation.num_clients={clients}", "split.cut_layer=2",
                            f"federation.server_adapters={mode}", f"data.max_train_samples={clients * 8}",
                            "data.max_eval_samples=1", "data.max_length=64"])
    s = prepare(cfg)
    server, workers = build_sfl(s, ByteCounter())
    for step, c in enumerate(workers):  # one step each: Adam state exists on both sides
        c.train_step(c.epoch_batches(1)[0], step)
    out = server.state_bytes()
    out["rss_growth"] = psutil.Process().memory_info().rss - rss0
    del server, workers, s
    gc.collect()
    return out


def makespans(model: str, clients: int, steps: int, seed: int, server: str) -> dict[str, float]:
    cfg = build_config({}, [f"model.name={model}", f"federation.num_clients={clients}", "split.cut_layer=2",
                            "federation.devices=mixed10", f"federation.server_device={server}",
                            "data.max_length=128"])
    from splitcom.models.load import load_model

    hf, _ = load_model(cfg.model.name)
    rng = random.Random(seed)
    policies = ["round_robin", "fifo", "random", "longest_tail_first"] + (["exact"] if clients <= MAX_EXACT else [])
    clocks = {p: SimClock.from_config(cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"schedule": p})}), hf.config, clients) for p in policies}
    total = dict.fromkeys(policies, 0.0)
    for _ in range(steps):
        # batches of 8 E2E-like samples (40-110 tokens), fp32 activations/gradients on the wire
        shapes = [[rng.randint(40, 110) for _ in range(8)] for _ in range(clients)]
        for p, clock in clocks.items():
            jobs = [clock.job(c, 2, 0, sum(sh), max(sh), sum(sh) * 576 * 4, sum(sh) * 576 * 4)
                    for c, sh in enumerate(shapes)]
            total[p] += simulate(jobs, make_schedule(p, seed)).makespan if p == "random" else clock.step(jobs)
    return total


def cut_policies(args) -> list[str]:
    """(c): one full simulated training run per cut policy on the same data, fleet and seed."""
    if not (E2E / "trainset.csv").is_file():
        return [f"## (c) Cut policies: skipped, E2E data not found at {E2E}", ""]
    common = [f"model.name={args.model}", f"data.dataset=e2e:{E2E}", f"data.max_train_samples={args.samples}",
              f"data.max_eval_samples={args.eval_samples}", "data.max_length=64",
              "data.partition.scheme=length_dirichlet", f"federation.num_clients={args.clients}",
              "federation.devices=mixed10", "federation.server_device=a100", f"train.epochs={args.epochs}",
              "train.batch_size=8", "train.lr=0.0005", "split.cut_layer=2", "logging.progress=false"]
    lines = [f"## (c) Cut policies on E2E: {args.model}, {args.samples} train samples, {args.clients} clients "
             f"(mixed10 fleet, a100 server), {args.epochs} epochs, start cut 2", "",
             "Simulated time is what the run would take on those devices and links (time model + real bytes); "
             "val ppl on " f"{args.eval_samples} E2E dev samples.", "",
             "| cut policy | cuts per client (first round -> last) | simulated s | vs fixed | val ppl | Δppl vs fixed "
             "| bytes up+down MB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    res = {}
    for policy in ("fixed", "memory_fit", "adaptive"):
        out = args.runs / policy
        done = out / "summary.json"
        cfg = build_config({}, common + [f"split.cut_policy={policy}"])
        if args.resume and done.is_file() and load_config(out / "config.yaml") == cfg:
            res[policy] = json.loads(done.read_text())  # the same run already finished
        else:
            res[policy] = run(cfg, out, progress=False)
        s = res[policy]
        hist = s.get("cuts_by_round") or [s["cuts"]]
        base = res["fixed"]
        lines.append(f"| {policy} | {hist[0]} -> {hist[-1]} | {s['simulated_s']:.1f} | "
                     f"{100 * (s['simulated_s'] / base['simulated_s'] - 1):+.1f} % | {s['val_ppl']:.3f} | "
                     f"{100 * (s['val_ppl'] / base['val_ppl'] - 1):+.2f} % | "
                     f"{(s['bytes_up'] + s['bytes_down']) / 1e6:.2f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--servers", nargs="+", default=["a100", "rtx-4090", "laptop-cpu"])
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--samples", type=int, default=80, help="(c): E2E training samples")
    ap.add_argument("--eval-samples", type=int, default=24, help="(c): E2E dev samples")
    ap.add_argument("--epochs", type=int, default=4, help="(c): epochs (= rounds the adaptive rule gets)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-hetero")
    ap.add_argument("--resume", action="store_true", help="(c): reuse finished runs")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"a": server_memory, "b": schedules, "c": cut_policies}
    for name in args.parts:
        (args.out / f"hetero-{name}.md").write_text("\n".join(parts[name](args)))
    fragments = [args.out / f"hetero-{n}.md" for n in "abc" if (args.out / f"hetero-{n}.md").is_file()]
    (args.out / "hetero.md").write_text("# Heterogeneous-fleet benchmarks\n\n" + "\n".join(
        f.read_text() for f in fragments))
    print(f"wrote {args.out / 'hetero.md'}")


def server_memory(args) -> list[str]:
    lines = []
    shared = memory(args.model, args.clients, "per_client")
    copies = memory(args.model, args.clients, "per_client_copies")
    gib = 2**30
    lines += [f"## (a) Server memory, {args.model}, {args.clients} clients", "",
              "| server | parameters GiB | optimizer MiB | total GiB | RSS growth GiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, m in (("one frozen base + per-client adapters", shared), ("one model copy per client", copies)):
        lines.append(f"| {name} | {m['parameters'] / gib:.3f} | {m['optimizer'] / 2**20:.2f} | "
                     f"{m['total'] / gib:.3f} | {m['rss_growth'] / gib:.3f} |")
    saving = 1 - shared["total"] / copies["total"]
    lines += ["", f"Measured server state: **{100 * saving:.1f} % less** with one base (published 79 %, goal >= 85 %).",
              ""]
    print(lines[-2], flush=True)
    return lines


def schedules(args) -> list[str]:
    lines = [f"## (b) Makespan per epoch ({args.steps} round-robin steps), mixed10 fleet, {args.model}, cut 2, "
             "fp32 on the wire", "", "A schedule only matters while the server is the bottleneck, so each server "
             "device is shown: a fast server serves every request before the next arrives.", ""]
    for server in args.servers:
        for n in sorted({args.clients, min(args.clients, MAX_EXACT)}):
            t = makespans(args.model, n, args.steps, 0, server)
            lines += [f"{server} server, {n} clients:", "", "| policy | simulated s | vs fifo | vs exact |",
                      "| --- | ---: | ---: | ---: |"]
            for p, v in t.items():
                vs_exact = f"{100 * (v / t['exact'] - 1):+.2f} %" if "exact" in t else "n/a (exact: <= 9 clients)"
                lines.append(f"| {p} | {v:.2f} | {100 * (v / t['fifo'] - 1):+.2f} % | {vs_exact} |")
            lines.append("")
            print("\n".join(lines[-len(t) - 4:]), flush=True)
    return lines

if __name__ == "__main__":
    main()
