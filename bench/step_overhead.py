"""SFL step time (all clients, in-process transport) against the centralized PEFT LoRA step on the same
model, batches and data. Measured side by side, interleaved, in one process: these machines are noisy.

    .venv/bin/python bench/step_overhead.py [--models tiny-llama smollm2-135m] [--steps 6] [--cut 2]

Prints per model: median seconds per batch for each side and the ratio SFL / centralized (goal <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from splitcom.config import build_config
from splitcom.federation.centralized import CentralizedTrainer
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl
from splitcom.transport.counters import ByteCounter

warnings.filterwarnings("ignore")


def measure(model: str, steps: int, cut: int, clients: int, batch_size: int, max_length: int) -> dict:
    overrides = [f"model.name={model}", f"split.cut_layer={cut}", f"federation.num_clients={clients}",
                 f"train.batch_size={batch_size}", f"data.max_length={max_length}",
                 f"data.max_train_samples={clients * batch_size * (steps + 1)}", "data.max_eval_samples=1"]
    cfg = build_config({}, overrides)
    sfl_setup, central_setup = prepare(cfg), prepare(cfg)
    _, workers = build_sfl(sfl_setup, ByteCounter())
    central = CentralizedTrainer(central_setup.split.model, central_setup.bank, central_setup.train,
                                 lr=cfg.train.lr, batch_size=batch_size, pad_id=central_setup.pad_id)
    plans = [w.epoch_batches(1) for w in workers]
    t_sfl, t_central = [], []
    for step in range(steps + 1):  # step 0 warms both up and is not counted
        batch_set = [plan[step] for plan in plans]
        t0 = time.perf_counter()
        for w, b in zip(workers, batch_set, strict=True):  # one round-robin step: every client once
            w.train_step(b, step)
        t1 = time.perf_counter()
        for b in batch_set:  # the same batches through plain PEFT
            central.train_step(b, step)
        t2 = time.perf_counter()
        if step:
            t_sfl.append((t1 - t0) / len(batch_set))
            t_central.append((t2 - t1) / len(batch_set))
    sfl, cen = statistics.median(t_sfl), statistics.median(t_central)
    tokens = statistics.mean(b.num_tokens for plan in plans for b in plan[: steps + 1])
    return {"model": model, "sfl_s": sfl, "central_s": cen, "ratio": sfl / cen, "tokens_per_batch": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.clients} clients, cut {args.cut}, "
          f"batch {args.batch_size}, {args.steps} timed round-robin steps")
    print(f"{'model':<14} {'tokens/batch':>12} {'SFL s/batch':>12} {'central s/batch':>16} {'ratio':>7}")
    for m in args.models:
        r = measure(m, args.steps, args.cut, args.clients, args.batch_size, args.max_length)
        print(f"{r['model']:<14} {r['tokens_per_batch']:>12.0f} {r['sfl_s']:>12.4f} {r['central_s']:>16.4f} "
              f"{r['ratio']:>7.3f}")


if __name__ == "__main__":
    main()
