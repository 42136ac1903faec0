"""Decode speed of `splitcom eval`'s beam search on real E2E dev inputs; trains nothing.

    .venv/bin/python bench/generate_speed.py [--n 16] [--beams 4] [--batch-size 8] [--threads 0] [--run OUT]

Loads smollm2-135m with a fresh LoRA merged in (the base model's outputs: they run long, so this is
near the worst case per input), or the merged adapter of a finished run directory with ``--run``,
generates for the first N distinct E2E dev inputs, and prints seconds, output tokens, tokens/s and
the time projected for 100 inputs. Skips with a message where ../shared/data/e2e is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from splitcom.data import e2e
from splitcom.evaluate.generate import (
    GenerationSettings,
    busy_cores,
    generate_with_stats,
    group_inputs,
    load_merged,
)
from splitcom.models.adapters import attach_lora
from splitcom.models.load import load_model

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--run", type=Path, help="a run directory (config.yaml, adapter/) instead of a fresh LoRA")
    ap.add_argument("--n", type=int, default=16, help="distinct E2E dev inputs")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="inputs per generate call")
    ap.add_argument("--threads", type=int, default=0, help="0: as many as there are idle cores")
    ap.add_argument("--show", type=int, default=3, help="outputs to print")
    args = ap.parse_args()
    if not (E2E / "devset.csv").is_file():
        print(f"skipped: E2E data not found at {E2E}")
        return 0
    t0 = time.perf_counter()
    if args.run:
        _, model, tok = load_merged(args.run)
    else:
        base, tok = load_model(args.model)
        model = attach_lora(base, rank=8, alpha=16.0, dropout=0.0).merge_and_unload()
        model.eval()
    load_s = time.perf_counter() - t0
    inputs = group_inputs(e2e.load_split(str(E2E), "dev"), args.n)
    settings = GenerationSettings(num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, threads=args.threads)
    print(f"model {args.run or args.model} loaded in {load_s:.1f} s; {len(os.sched_getaffinity(0))} cores, "
          f"torch threads {torch.get_num_threads()}, busy cores now {busy_cores()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    preds, stats = generate_with_stats(model, tok, [i.source for i in inputs], settings)
    for item, pred in list(zip(inputs, preds, strict=True))[: args.show]:
        print(f"  {item.source}\n    -> {pred}")
    per_input = stats.seconds / stats.inputs
    print(f"inputs {stats.inputs}, beam {args.beams}, batch {args.batch_size}, threads used {stats.threads}: "
          f"{stats.seconds:.1f} s, {stats.tokens} output tokens ({stats.tokens / stats.inputs:.1f} per input), "
          f"{stats.tokens_per_s:.1f} tokens/s, {per_input:.2f} s per input, projected 100 inputs "
          f"{100 * per_input:.0f} s; load average after {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
