"""Batch loss of one run against another, paired by (epoch, step, client) (issue 18).

Two rows that share data, seed and clients train the same batches in the same order, so their step events pair
one to one; the difference shows within an epoch where a change starts to cost (or diverges), long before the
epoch's val ppl. Reads the runs' metrics.jsonl (``runs/...``: bench/results keeps no step events).

    .venv/bin/python bench/step_losses.py runs/regime8/ushape+shared+lean+skip+linear \
        runs/regime8/ushape+shared+lean+skip+act_down-int2o+linear --epoch 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitcom.runlog import read_metrics


def step_losses(run: Path) -> dict[tuple[int, int, int], float]:
    """(epoch, step, client) -> batch loss; a resumed run's repeated steps keep the last."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        sys.exit(f"error: {path} not found (step events live in the run directory, not in bench/results)")
    try:
        events = read_metrics(path)
    except ValueError as err:
        sys.exit(f"error: {err}")
    return {(e["epoch"], e["step"], e["client"]): e["loss"] for e in events if e.get("event") == "step"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path, help="run directory of the reference row")
    ap.add_argument("other", type=Path, help="run directory of the row compared with it")
    ap.add_argument("--epoch", type=int, required=True)
    ap.add_argument("--bin", type=int, default=5, help="steps per line")
    args = ap.parse_args()
    ref, other = step_losses(args.reference), step_losses(args.other)
    keys = sorted(k for k in other if k in ref and k[0] == args.epoch)
    if not keys:
        sys.exit(f"error: no step of epoch {args.epoch} in both runs")
    bins: dict[int, list[tuple[float, float]]] = {}
    for k in keys:
        bins.setdefault(k[1] // args.bin, []).append((ref[k], other[k]))
    print(f"epoch {args.epoch}: batch loss, mean over the clients' steps in each bin")
    print("| steps | reference | other | difference | pairs |\n| --- | ---: | ---: | ---: | ---: |")
    for b, pairs in sorted(bins.items()):
        r, o = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        print(f"| {b * args.bin} to {b * args.bin + args.bin - 1} | {r:.4f} | {o:.4f} | {o - r:+.4f} | {len(pairs)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
