"""How act_up savings scale with local steps (issue 18, item 4): fp32 SFL and the `all` row of bench/comm.py at
S local steps per client per round (10 clients, batch 8, 2 epochs; S set by the number of train samples), with
the true drift between sightings (``logging.drift``). S = 25 is the learning regime's pair (runs/regime).

    .venv/bin/python bench/scaling.py [--epoch 2]      # after the rows below have run

    # one S (samples = 80 * S); the same settings as bench/results/regime.md
    OMP_NUM_THREADS=1 .venv/bin/python bench/comm.py --rows baseline all --samples 800 --epochs 2 \
        --eval-samples 200 --clients 10 --lr 5e-4 --max-length 64 --threads 1 --resume \
        --out bench/results/scaling/S10 --runs runs/scaling/S10 --set logging.drift=true

Writes bench/results/scaling.md and scaling.png, with the extrapolation to full E2E stated there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_STEP = 80  # 10 clients x batch 8: S local steps per client per round need 80 * S samples


def row(run: Path, epoch: int) -> dict | None:
    from splitcom.runlog import read_metrics

    if not (run / "metrics.jsonl").is_file():
        return None
    events = read_metrics(run / "metrics.jsonl")
    ev = {e["epoch"]: e for e in events if e["event"] == "eval"}
    reuse = {e["epoch"]: e for e in events if e["event"] == "reuse"}
    if epoch not in ev:
        return None
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    return {"eval": ev[epoch], "reuse": reuse, "summary": summary, "first": ev.get(1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epoch", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    E = args.epoch
    dirs = {1: ROOT / "runs" / "scaling" / "S1", 10: ROOT / "runs" / "scaling" / "S10", 25: ROOT / "runs" / "regime",
            50: ROOT / "runs" / "scaling" / "S50"}
    lines = ["# act_up savings against local steps per client per round (issue 18, item 4)", "",
             f"fp32 SFL (`baseline`) and `all` (reuse at 0.999, int8 first sights, int4 DELTA refreshes, prompt "
             f"prefixes, zstd, int8 adapter deltas) of bench/comm.py at epoch {E}: 10 clients, length_dirichlet 0.5, "
             "smollm2-135m, cut 2, lr 5e-4, batch 8, max length 64, val ppl on the same 200 E2E dev samples. "
             "S = train samples / 80. Drift: 1 - cos of a sample's act_up between its sightings in epochs 1 and 2 "
             "(median / p90; per channel: every channel scaled by its RMS first). Prompt rows shared: act_up rows a first "
             "sight did not send because an earlier sample of the same client with the same prompt (E2E: the same "
             "MR) had sent them, over all rows of an epoch.", "",
             "| S | samples | fp32 act_up MB | all act_up MB | act_up less | of which epoch 1 | epoch 2 alone less | "
             "reuse epoch 2 | act_up drift median / p90 | per channel | prompt rows shared | val ppl fp32 | "
             "val ppl all | Δppl |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    points = []
    for S, d in dirs.items():
        base, best = row(d / "baseline", E), row(d / "all", E)
        if base is None or best is None:
            lines.append(f"| {S} | {S * SAMPLES_PER_STEP} | not run yet | | | | | | | | | | | |")
            continue
        fa, aa = base["eval"]["bytes_by_stream"]["act_up"], best["eval"]["bytes_by_stream"]["act_up"]
        f1, a1 = base["first"]["bytes_by_stream"]["act_up"], best["first"]["bytes_by_stream"]["act_up"]
        r2 = best["reuse"].get(2, {})
        drift = r2.get("drift", {}).get("act_up", {})
        q = lambda k, d=drift: f"{d[k]['median']:.2e} / {d[k]['p90']:.2e}" if k in d else "-"  # noqa: E731
        p0, p1 = base["eval"]["val_ppl"], best["eval"]["val_ppl"]
        red, red2 = 1 - aa / fa, 1 - (aa - a1) / (fa - f1)
        # prompt prefixes are shared by first sights only: rows shared over the rows of one epoch (every sample once)
        tr, epochs = best["summary"].get("transfers_by_stream", {}).get("act_up"), best["summary"].get("epochs")
        shared = tr["prefix_rows_shared"] / (best["summary"]["train_tokens"] / epochs) if tr and epochs else None
        points.append({"S": S, "reduction": red, "epoch2": red2, "first": 1 - a1 / f1,
                       "reuse": r2.get("reuse_ratio", 0.0),
                       "drift": drift.get("between", {}).get("median"), "drift_p90": drift.get("between", {}).get("p90")})
        lines.append(f"| {S} | {S * SAMPLES_PER_STEP} | {fa / 1e6:,.1f} | {aa / 1e6:,.2f} | {100 * red:.2f} % | "
                     f"{100 * (1 - a1 / f1):.2f} % | {100 * red2:.2f} % | {r2.get('reuse_ratio', 0):.3f} | "
                     f"{q('between')} | {q('between_channel')} | "
                     f"{'-' if shared is None else format(100 * shared, '.1f') + ' %'} | {p0:.3f} | {p1:.3f} | "
                     f"{100 * (p1 / p0 - 1):+.2f} % |")
    (args.out / "scaling.json").write_text(json.dumps(points, indent=1))
    if points:
        plot(points, args.out / "scaling.png")
        lines += ["", "![savings against local steps](scaling.png)"]
    notes = args.out / "scaling.notes.md"
    if notes.is_file():
        lines += ["", notes.read_text()]
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = [p["S"] for p in points]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(S, [100 * p["reduction"] for p in points], "o-", label="act_up less, 2 epochs")
    a.plot(S, [100 * p["epoch2"] for p in points], "s--", label="act_up less, epoch 2 alone")
    a.plot(S, [100 * p["reuse"] for p in points], "^:", label="reuse in epoch 2")
    a.set_xscale("log")
    a.set_xlabel("local steps per client per round (S)")
    a.set_ylabel("%")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(S, [p["drift"] for p in points], "o-", label="median")
    b.plot(S, [p["drift_p90"] for p in points], "s--", label="p90")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("local steps per client per round (S)")
    b.set_ylabel("1 - cos(act_up) between sightings")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
