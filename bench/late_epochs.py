"""Late epochs of long learning-regime rows (issue 18): what act_up costs epoch by epoch once every sample has
been seen, with int4, int2 and 1-bit (+ outliers) DELTA refreshes, against fp32 SFL at the same epochs.

    .venv/bin/python bench/late_epochs.py [--rows NAME=RUN ...] [--epochs 4] [--out bench/results/late_epochs.md]

Writes the table to OUT and a plot beside it (OUT with .png: val ppl and act_up sent so far, by epoch).

Default rows: fp32 SFL (`runs/regime4/baseline`) and `all` (`runs/regime4/all`), both lengthened exactly from
the 2-epoch regime runs (`bench/comm.py --resume --epochs 4`), and the rows `bench/fork_queue.sh` forked from
`all`'s epoch-2 checkpoint into runs/fork4 (`bench/comm.py --fork-from`): epochs 1 and 2 are `all`'s, epochs 3
and on use the row's DELTA codec. Figures come from each run's metrics.jsonl (`eval` and `reuse` events) and
the scores `bench/comm.py --score` or `bench/regime.py` wrote; rows not finished yet show what they have.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = {"fp32 SFL": "runs/regime4/baseline", "all (int4 DELTAs)": "runs/regime4/all",
           "all+delta-int2": "runs/fork4/all+delta-int2", "all+delta-sign1o": "runs/fork4/all+delta-sign1o"}
FULL_E2E_EPOCHS = 50  # the paper's setting, for the extrapolation


def load(run: Path) -> dict | None:
    from splitcom.runlog import read_metrics

    if not (run / "metrics.jsonl").is_file():
        return None
    events = read_metrics(run / "metrics.jsonl")
    evals = {e["epoch"]: e for e in events if e["event"] == "eval"}
    act = {ep: evals[ep]["bytes_by_stream"].get("act_up", 0) for ep in evals}
    per_epoch = {ep: act[ep] - act.get(ep - 1, 0) for ep in act if ep >= 1}
    reuse = {e["epoch"]: e for e in events if e["event"] == "reuse"}
    bleu = {}
    for ep_dir in sorted((run / "epochs").glob("[0-9]*")) if (run / "epochs").is_dir() else []:
        if (sc := ep_dir / "eval" / "scores.json").is_file():
            bleu[int(ep_dir.name)] = json.loads(sc.read_text())["BLEU"]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    if (sc := run / "eval" / "scores.json").is_file() and summary.get("epochs"):
        bleu.setdefault(summary["epochs"], json.loads(sc.read_text())["BLEU"])
    fork = json.loads((run / "FORK.json").read_text()) if (run / "FORK.json").is_file() else None
    if fork and (parent := load(ROOT / fork["from"])):  # a fork's first epochs are its parent's
        bleu = {**{e: b for e, b in parent["bleu"].items() if e <= fork["epoch"]}, **bleu}
    return {"evals": evals, "act": act, "per_epoch": per_epoch, "reuse": reuse, "bleu": bleu, "fork": fork,
            "samples": summary.get("train_samples")}


def plot(rows: dict, epochs: int, path: Path) -> None:
    """Val ppl and act_up sent so far (log scale) by epoch, one line a row: where people would rather look."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (_, r) in rows.items():
        eps = [e for e in range(1, epochs + 1) if e in r["evals"]]
        a.plot(eps, [r["evals"][e]["val_ppl"] for e in eps], marker="o", label=name)
        eps = [e for e in range(1, epochs + 1) if e in r["act"]]
        b.plot(eps, [r["act"][e] / 1e6 for e in eps], marker="o", label=name)
    a.set(xlabel="epoch", ylabel="val ppl (200 dev samples)", title="quality")
    b.set(xlabel="epoch", ylabel="act_up sent so far (MB)", yscale="log", title="act_up bytes")
    a.grid(alpha=0.3)
    b.grid(alpha=0.3, which="both")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=[f"{k}={v}" for k, v in DEFAULT.items()], metavar="NAME=RUN")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "late_epochs.md")
    args = ap.parse_args()
    rows = {}
    for spec in args.rows:
        name, _, path = spec.partition("=")
        got = load(ROOT / path if not Path(path).is_absolute() else Path(path))
        if got is None:
            print(f"{name}: no metrics.jsonl under {path} yet", file=sys.stderr)
            continue
        rows[name] = (path, got)
    if not rows:
        print("nothing to report", file=sys.stderr)
        return 0
    base = next(iter(rows.values()))[1]  # the first row is the fp32 reference
    base_name = next(iter(rows))
    # fp32 sends every sample's act_up in full every epoch: the same bytes each epoch (checked on the epochs it
    # ran), so its bytes for later epochs are known without running them (its quality is not)
    known = sorted(base["per_epoch"])
    if known and len({base["per_epoch"][e] for e in known}) == 1:
        for ep in range(known[-1] + 1, args.epochs + 1):
            base["per_epoch"][ep] = base["per_epoch"][known[-1]]
            base["act"][ep] = base["act"][ep - 1] + base["per_epoch"][ep]
    lines = ["# Late epochs: act_up with cheaper refreshes (issue 18)", "",
             f"2000 E2E train samples, 10 clients, smollm2-135m, cut 2, lr 5e-4; val ppl on 200 dev samples, BLEU on "
             f"100 dev inputs (beam 4). *less*: against `{base_name}`'s act_up in the same epoch; *all so far*: over "
             "epochs 1 to this one. *refresh*: act_up bytes of the epoch per sample not reused (DELTA against the "
             "receiver's copy, zstd) as a share of one sample's fp32 act_up. *stale*: median 1 - cos between the "
             "sample's act_up and the receiver's copy. One seed per row. fp32 sends every sample in full every epoch, "
             "the same act_up bytes each epoch, so its bytes stand for the epochs it has not run (its val ppl and "
             "BLEU there are `-`).", ""]
    for name, (path, r) in rows.items():
        note = f" (forked from `{r['fork']['from']}` after epoch {r['fork']['epoch']})" if r["fork"] else ""
        lines.append(f"- `{name}`: `{path}`{note}")
    lines += ["", "| row | epoch | val ppl | Δppl | BLEU | reuse | stale median | act_up MB | this epoch less | "
              "all so far less | refresh |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    extrap = []
    for name, (_, r) in rows.items():
        costs = {}
        for ep in range(1, args.epochs + 1):
            if ep not in r["evals"]:
                continue
            ev, b_ev = r["evals"][ep], base["evals"].get(ep)
            ppl = ev["val_ppl"]
            dppl = f"{100 * (ppl / b_ev['val_ppl'] - 1):+.2f} %" if b_ev and r is not base else "-"
            bl = f"{r['bleu'][ep]:.4f}" if ep in r["bleu"] else "-"
            ru = r["reuse"].get(ep, {})
            ratio = ru.get("reuse_ratio")
            stale = ru.get("drift", {}).get("act_up", {}).get("stale", {}).get("median")
            mine, fp = r["per_epoch"][ep], base["per_epoch"].get(ep)
            less = f"{100 * (1 - mine / fp):.2f} %" if fp and r is not base else "-"
            cum = f"{100 * (1 - r['act'][ep] / base['act'][ep]):.2f} %" if ep in base["act"] and r is not base else "-"
            n = r["samples"] or 2000
            refresh = "-"
            if fp and ratio is not None and ep >= 2 and ratio < 1 and r is not base:
                refresh = f"{100 * mine / ((1 - ratio) * n) / (fp / n):.2f} %"
            if fp:
                costs[ep] = mine / fp
            lines.append(f"| {name} | {ep} | {ppl:.3f} | {dppl} | {bl} | {'-' if ratio is None else f'{ratio:.3f}'} | "
                         f"{'-' if stale is None else f'{stale:.2e}'} | {mine / 1e6:.2f} | {less} | {cum} | {refresh} |")
        late = [costs[e] for e in costs if e >= 3]
        if r is not base and late and 1 in costs and 2 in costs:
            m = sum(late) / len(late)
            est = 1 - (costs[1] + costs[2] + (FULL_E2E_EPOCHS - 2) * m) / FULL_E2E_EPOCHS
            extrap.append(f"- `{name}`: epochs 3 to {max(costs)} cost {100 * m:.2f} % of fp32 each on average; "
                          f"if every later epoch did the same, {FULL_E2E_EPOCHS} epochs would send "
                          f"**{100 * est:.2f} % less** act_up than fp32.")
    if extrap:
        lines += ["", f"## Extrapolation to {FULL_E2E_EPOCHS} epochs", "",
                  "An extrapolation, not a measurement: epochs 1 and 2 as measured, every later epoch at the mean "
                  "cost of the measured late epochs (drift keeps falling as the model converges, so this may be "
                  "pessimistic; a longer run would show whether reuse keeps alternating).", "", *extrap]
    notes = args.out.with_suffix(".notes.md")
    if notes.is_file():
        lines += ["", notes.read_text()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    plot(rows, args.epochs, args.out.with_suffix(".png"))
    print(args.out.read_text())
    print(f"plot: {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
