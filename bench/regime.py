"""The learning-regime study (issue 18, item 1): follows long `bench/comm.py` rows as they train, keeps each
finished epoch's adapter, scores it, and writes bench/results/regime.md.

    .venv/bin/python bench/regime.py [--runs runs/regime] [--rows baseline centralized] [--score 100]
                                     [--watch] [--threads 1]

A row's `adapter/` is overwritten at every epoch, so a snapshot (config.yaml + adapter/) of each finished epoch
goes to RUNS/ROW/epochs/N/ as soon as the row's checkpoint says the epoch finished; each snapshot is scored once
(beam 4 on the first --score distinct E2E dev inputs, OUT/eval/scores.json as `splitcom eval` writes it).
Since no learning-rate schedule depends on the number of epochs, epoch N of a 3-epoch row is also the end of
an N-epoch row: one long row gives the whole quality-against-epochs curve. With --watch it polls until every
row has finished and every epoch is scored (resumable: snapshots and scores already there are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snapshot(row: Path) -> list[int]:
    """Copy the adapter of the epoch the checkpoint holds, if not copied yet; the epochs snapshotted so far."""
    import torch

    ckpt = row / "checkpoint.pt"
    if ckpt.is_file():
        epoch = torch.load(ckpt, weights_only=True, map_location="cpu")["epoch"]
        dest = row / "epochs" / str(epoch)
        if not dest.is_dir():
            tmp = dest.with_name(f".{epoch}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy(row / "config.yaml", tmp / "config.yaml")
            shutil.copytree(row / "adapter", tmp / "adapter")
            if torch.load(ckpt, weights_only=True, map_location="cpu")["epoch"] == epoch:  # not overwritten since
                os.replace(tmp, dest)
            else:
                shutil.rmtree(tmp)
    return sorted(int(p.name) for p in (row / "epochs").glob("[0-9]*")) if (row / "epochs").is_dir() else []


def score(snap: Path, n: int, beams: int) -> dict:
    from dataclasses import asdict

    from splitcom.evaluate.generate import GenerationSettings, evaluate_run

    old = snap / "eval" / "scores.json"
    settings = GenerationSettings(num_beams=beams)
    if old.is_file():
        sc = json.loads(old.read_text())
        if sc.get("max_samples") == n and sc.get("generation") == asdict(settings):
            return sc
    return evaluate_run(snap, max_samples=n, settings=settings)


def evals(row: Path) -> dict[int, dict]:
    from splitcom.runlog import read_metrics

    return {e["epoch"]: e for e in read_metrics(row / "metrics.jsonl") if e["event"] == "eval"} \
        if (row / "metrics.jsonl").is_file() else {}


def _rel(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def report(args, rows: dict[str, dict]) -> None:
    lines = ["# Learning regime (issue 18, item 1)", "",
             f"Rows of `bench/comm.py` under `{_rel(args.runs)}` (settings in each row's config.yaml and below), followed by "
             "`bench/regime.py`: each finished epoch's adapter is scored on the first "
             f"{args.score} distinct E2E dev inputs (beam {args.beams}, length penalty 0.8, no-repeat 4-grams, at most "
             "64 new tokens); val ppl on the row's fixed dev samples (`data.max_eval_samples`). *wall* is the "
             "row's own clock at that epoch's evaluation on a shared 2-core CPU (load in the notes), so compare "
             "rows by quality and bytes.", "",
             "| row | settings | epoch | local steps / client / round | val ppl | BLEU | NIST | METEOR | ROUGE_L | "
             "CIDEr | bytes up+down | wall min |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        for epoch in sorted(r["evals"]):
            if epoch == 0:
                continue
            e, sc = r["evals"][epoch], r["scores"].get(epoch, {})
            fmt = lambda k, f=".4f", sc=sc: "-" if sc.get(k) is None else format(sc[k], f)  # noqa: E731
            lines.append(f"| {name} | {r['settings']} | {epoch} | {r['steps']} | {e['val_ppl']:.3f} | {fmt('BLEU')} | "
                         f"{fmt('NIST', '.3f')} | {fmt('METEOR')} | {fmt('ROUGE_L')} | {fmt('CIDEr', '.3f')} | "
                         f"{e['bytes_up'] + e['bytes_down']:,} | {e['wall_s'] / 60:.0f} |")
    out = args.out / "regime.md"
    notes = out.with_suffix(".notes.md")
    extra = ["", notes.read_text()] if notes.is_file() else []
    out.write_text("\n".join(lines + extra) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "regime")
    ap.add_argument("--rows", nargs="+", default=None, help="row directories under --runs (default: all)")
    ap.add_argument("--score", type=int, default=100)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--watch", action="store_true", help="poll until every row has finished and is scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from splitcom.config import load_config

    while True:
        rows, busy = {}, False
        names = args.rows or sorted(p.name for p in args.runs.iterdir() if (p / "config.yaml").is_file())
        for name in names:
            row = args.runs / name
            cfg = load_config(row / "config.yaml")
            epochs = snapshot(row)
            scores = {}
            for epoch in epochs:
                sc = score(row / "epochs" / str(epoch), args.score, args.beams)
                scores[epoch] = sc
                print(f"{name} epoch {epoch}: BLEU {sc['BLEU']:.4f}", flush=True)
            sfl = cfg.federation.mode == "sfl"
            per_client = -(-(cfg.data.max_train_samples // (cfg.federation.num_clients if sfl else 1))
                           // cfg.train.batch_size)
            rows[name] = {"evals": evals(row), "scores": scores, "steps": f"~{per_client}" if sfl else "-",
                          "settings": (f"{cfg.federation.mode}, {cfg.data.max_train_samples} samples, "
                                       f"{cfg.federation.num_clients if sfl else 1} clients, lr {cfg.train.lr}, "
                                       f"aggregate {cfg.federation.aggregate_every}, "
                                       f"{cfg.federation.server_adapters if sfl else 'one model'}")}
            busy |= not (row / "summary.json").is_file()
        report(args, rows)
        if not (args.watch and busy):
            return 0
        time.sleep(60)


if __name__ == "__main__":
    sys.exit(main())
