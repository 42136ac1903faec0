"""How much of a BLEU difference is the draw of dev inputs (issue 18): a paired bootstrap over the inputs two runs
were scored on, and the same runs rescored on more inputs.

    .venv/bin/python bench/bleu_noise.py --pairs ROW@s2=BASE@s2 ... [--runs runs/regime8]
        [--kept bench/results/regime8] [--inputs 547] [--resamples 1000] [--threads 2]
        [--out bench/results/regime8/bleu_noise.md]

A pair is two runs of one seed (each a directory under --runs, or what bench/regime.py kept of it under --kept). For
each pair and each number of inputs (the 100 every row was scored on, and --inputs where given):

* ΔBLEU: the row's mteval BLEU minus the base's on the same distinct E2E dev inputs (beam 4, as `splitcom eval`);
* the paired bootstrap (Koehn, 2004): the inputs drawn with replacement --resamples times, both runs scored on
  each draw; the spread of ΔBLEU over the draws (standard deviation and 95 % interval) is what the choice of
  inputs alone moves it by. sacrebleu's `paired_bs` reports a p-value against the base, not this spread, and
  its BLEU is not mteval's smoothing, so the draws are scored here from per-input statistics (clipped n-gram
  matches and totals, output and closest reference lengths add over inputs).

--inputs N rescores a run's final adapter on the first N distinct dev inputs (547: all of E2E's dev set) into
RUN/rescore-N/eval/ (config.yaml and adapter/ linked from the run; its eval/ with the 100-input scores is left
as it is). Resumable: a rescore whose scores.json has N inputs is read, not redone. A run must still be under
--runs to be rescored (kept rows have no adapter).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEAMS = 4  # the regime rows' scoring: beam 4 (bench/comm.py --beams 4)


def read_eval(eval_dir: Path) -> tuple[list[str], list[str], int]:
    """(predictions, inputs, how many) of one scoring."""
    preds = (eval_dir / "predictions.txt").read_text(encoding="utf-8").splitlines()
    inputs = (eval_dir / "inputs.txt").read_text(encoding="utf-8").splitlines()
    if len(preds) != len(inputs):
        sys.exit(f"{eval_dir}: {len(preds)} predictions for {len(inputs)} inputs")
    return preds, inputs, len(inputs)


def references(run: Path, n: int, inputs: list[str]) -> list[list[str]]:
    """The reference groups of the run's first ``n`` distinct dev inputs, checked against the inputs it scored."""
    from splitcom.config import data_seed, load_config
    from splitcom.evaluate.generate import eval_examples, group_inputs

    cfg = load_config(run / "config.yaml")
    got = group_inputs(eval_examples(cfg.data.dataset, "dev", cfg.data.synthetic_size, data_seed(cfg), cfg.data), n)
    if [g.source for g in got] != inputs:
        sys.exit(f"{run}: its inputs.txt is not the first {n} distinct dev inputs of {cfg.data.dataset}")
    return [list(g.refs) for g in got]


def stats(hyps: list[str], refs: list[list[str]]) -> list[tuple]:
    """Per input: (matches by order, totals by order, output length, closest reference length), mteval tokens."""
    from splitcom.evaluate.metrics import bleu_stats, mteval_tokenize

    return [bleu_stats([mteval_tokenize(" ".join(h.split()))], [[mteval_tokenize(" ".join(r.split())) for r in group]])
            for h, group in zip(hyps, refs, strict=True)]


@functools.cache
def scored_stats(eval_dir: Path, refs_run: Path) -> list[tuple]:
    """The per-input statistics of one scoring against ``refs_run``'s references: once per scoring, however
    many pairs share it (several rows against one base)."""
    hyps, inputs, n = read_eval(eval_dir)
    return stats(hyps, cached_references(refs_run, n, tuple(inputs)))


@functools.cache
def cached_references(run: Path, n: int, inputs: tuple[str, ...]) -> list[list[str]]:
    return references(run, n, list(inputs))


def bleu_of(per: list[tuple], idx: list[int]) -> float:
    from splitcom.evaluate.metrics import mteval_bleu

    m = [sum(per[i][0][k] for i in idx) for k in range(4)]
    t = [sum(per[i][1][k] for i in idx) for k in range(4)]
    return mteval_bleu(m, t, sum(per[i][2] for i in idx), sum(per[i][3] for i in idx))


def rescore(run: Path, n: int) -> Path:
    """The run's final adapter scored on its first ``n`` distinct dev inputs: RUN/rescore-N/eval."""
    from splitcom.evaluate.generate import GenerationSettings, evaluate_run

    where = run / f"rescore-{n}"
    old = where / "eval" / "scores.json"
    if old.is_file() and json.loads(old.read_text()).get("max_samples") == n:
        return where / "eval"
    where.mkdir(exist_ok=True)
    for name in ("config.yaml", "adapter"):
        if not (where / name).exists():
            (where / name).symlink_to(Path("..") / name)
    sc = evaluate_run(where, max_samples=n, settings=GenerationSettings(num_beams=BEAMS))
    print(f"{run.name}: {n} inputs, BLEU {sc['BLEU']:.4f} ({sc['wall_s'] / 60:.1f} min)", flush=True)
    return where / "eval"


def compare(row: Path, base: Path, row_eval: Path, base_eval: Path, resamples: int, seed: int) -> dict:
    if read_eval(row_eval)[1] != read_eval(base_eval)[1]:
        sys.exit(f"{row_eval} and {base_eval} were scored on different inputs")
    refs_run = base if (base / "config.yaml").is_file() else row
    pr, pb = scored_stats(row_eval, refs_run), scored_stats(base_eval, refs_run)
    n = len(pr)
    every = list(range(n))
    rng = random.Random(seed)
    ds = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in every]
        ds.append(bleu_of(pr, idx) - bleu_of(pb, idx))
    ds.sort()
    mean = sum(ds) / len(ds)
    return {"inputs": n, "bleu": bleu_of(pr, every), "base_bleu": bleu_of(pb, every),
            "delta": bleu_of(pr, every) - bleu_of(pb, every),
            "sd": (sum((d - mean) ** 2 for d in ds) / (len(ds) - 1)) ** 0.5,
            "lo": ds[int(0.025 * len(ds))], "hi": ds[int(0.975 * len(ds)) - 1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", nargs="+", required=True, metavar="ROW=BASE", help="run names, e.g. A@s2=B@s2")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "regime8")
    ap.add_argument("--kept", type=Path, default=ROOT / "bench" / "results" / "regime8",
                    help="where bench/regime.py kept finished rows (their eval/ predictions and inputs)")
    ap.add_argument("--inputs", type=int, nargs="*", default=[], help="also rescore on this many distinct inputs")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "regime8" / "bleu_noise.md")
    args = ap.parse_args()
    pairs = []
    for spec in args.pairs:
        row, sep, base = spec.partition("=")
        if not sep or not row or not base:
            sys.exit(f"--pairs {spec!r}: expected ROW=BASE (two run names)")
        pairs.append((row, base))
    if any(n < 1 for n in args.inputs):
        sys.exit(f"--inputs {args.inputs}: each must be >= 1")
    import torch

    torch.set_num_threads(args.threads)

    def scored(name: str) -> tuple[Path, Path]:
        """(run dir, its 100-input eval dir): the run under --runs, else what --kept holds of it."""
        for d in (args.runs / name, args.kept / name):
            if (d / "eval" / "predictions.txt").is_file():
                return d, d / "eval"
        sys.exit(f"{name}: no eval/predictions.txt under {args.runs} or {args.kept}")

    rows = []
    for row, base in pairs:
        (rd, re_), (bd, be) = scored(row), scored(base)
        got = [compare(rd, bd, re_, be, args.resamples, seed=0)]
        for n in args.inputs:
            missing = [d for d in (rd, bd) if not (d / "adapter").is_dir()]
            if missing:
                sys.exit(f"--inputs {n}: {', '.join(map(str, missing))} has no adapter/ to rescore (its run is gone)")
            got.append(compare(rd, bd, rescore(rd, n), rescore(bd, n), args.resamples, seed=0))
        rows.append((row, base, got))
        for g in got:
            print(f"{row} - {base}, {g['inputs']} inputs: ΔBLEU {g['delta']:+.4f}, bootstrap sd {g['sd']:.4f}",
                  flush=True)
    lines = ["# How much of a ΔBLEU is the draw of dev inputs (issue 18)", "",
             f"`bench/bleu_noise.py`: each pair is two runs of one seed, scored on the same first N distinct E2E dev "
             f"inputs (beam {BEAMS}, mteval BLEU); *sd* and *95 %*: ΔBLEU's spread over {args.resamples} paired "
             f"bootstrap draws of those inputs (Koehn, 2004).", "",
             "| row | base | inputs | BLEU | base BLEU | ΔBLEU | sd | 95 % |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row, base, got in rows:
        for g in got:
            lines.append(f"| {row} | {base} | {g['inputs']} | {g['bleu']:.4f} | {g['base_bleu']:.4f} | "
                         f"{g['delta']:+.4f} | {g['sd']:.4f} | {g['lo']:+.4f} to {g['hi']:+.4f} |")
    notes = args.out.with_suffix(".notes.md")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines + (["", notes.read_text()] if notes.is_file() else [])) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
