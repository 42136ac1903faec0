"""The time model against measured CPU times on this machine.

    .venv/bin/python bench/timemodel_check.py [--model smollm2-135m] [--cuts 2 8 15] [--reps 3]

For each cut: the measured seconds of the client's head forward, the server's body forward + backward
(with the loss) and the client's head backward, on real batches, against the time model's prediction
for the `cpu-2core` profile (whose FLOP/s is itself a measured sgemm rate, see fleet/devices.py).
Prints the relative error of each phase and of the whole step.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from splitcom.config import build_config
from splitcom.federation.setup import prepare
from splitcom.fleet.clock import SimClock
from splitcom.models.split import causal_lm_loss, pad, unpad

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cuts", nargs="+", type=int, default=[2, 8, 15])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "timemodel.md")
    args = ap.parse_args()
    cfg = build_config({}, [f"model.name={args.model}", "data.max_length=128", "federation.num_clients=1",
                            f"data.max_train_samples={args.batch_size * (args.reps + 1)}", "data.max_eval_samples=1",
                            "federation.devices=[cpu-2core]", "federation.server_device=cpu-2core"])
    s = prepare(cfg)
    clock = SimClock.from_config(cfg, s.split.lm.config, 1)
    batches = [s.train[i: i + args.batch_size] for i in range(0, len(s.train), args.batch_size)]
    from splitcom.data.tokenize import collate

    title = (f"{torch.get_num_threads()} threads; {args.model}; batch {args.batch_size}; cpu-2core profile "
             f"{clock.devices[0].flops / 1e9:.1f} GFLOP/s")
    print(title)
    print(f"{'cut':>4} {'phase':<22} {'measured s':>11} {'predicted s':>12} {'error':>8}")
    md = ["# Time model against measured CPU times", "", f"This machine, {title}; median of {args.reps} "
          "batches per phase; error = predicted / measured - 1.", "",
          "| cut | phase | measured s | predicted s | error |", "| ---: | --- | ---: | ---: | ---: |"]
    for cut in args.cuts:
        s.bank.activate("default", range(s.split.num_layers))
        meas = {"client forward": [], "server fwd+bwd": [], "client backward": []}
        pred = {k: [] for k in meas}
        for b in [collate(x, s.pad_id) for x in batches][1:]:
            t0 = time.perf_counter()
            h = s.split.head(b.input_ids, b.lengths, cut)
            t1 = time.perf_counter()
            hs = pad(unpad(h.detach(), b.lengths)).requires_grad_(True)
            loss = causal_lm_loss(s.split.body(hs, b.lengths, cut), b.labels)
            loss.backward()
            t2 = time.perf_counter()
            h.backward(hs.grad)
            t3 = time.perf_counter()
            s.split.model.zero_grad(set_to_none=True)
            job = clock.job(0, cut, 0, b.num_tokens, b.input_ids.shape[1], 0, 0)
            meas["client forward"].append(t1 - t0)
            meas["server fwd+bwd"].append(t2 - t1)
            meas["client backward"].append(t3 - t2)
            # with 0 bytes and no latency on loopback, arrival = client fwd, tail = client bwd
            pred["client forward"].append(job.arrival - clock.devices[0].latency_s)
            pred["server fwd+bwd"].append(job.service)
            pred["client backward"].append(job.tail - clock.devices[0].latency_s)
        tot_m = tot_p = 0.0
        for k in meas:
            m, p = statistics.median(meas[k]), statistics.median(pred[k])
            tot_m, tot_p = tot_m + m, tot_p + p
            print(f"{cut:>4} {k:<22} {m:>11.3f} {p:>12.3f} {100 * (p / m - 1):>+7.1f}%")
            md.append(f"| {cut} | {k} | {m:.3f} | {p:.3f} | {100 * (p / m - 1):+.1f} % |")
        print(f"{cut:>4} {'whole step':<22} {tot_m:>11.3f} {tot_p:>12.3f} {100 * (tot_p / tot_m - 1):>+7.1f}%")
        md.append(f"| {cut} | **whole step** | {tot_m:.3f} | {tot_p:.3f} | {100 * (tot_p / tot_m - 1):+.1f} % |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
