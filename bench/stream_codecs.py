"""What each U-shape stream looks like to a codec: captures every sample's act_down / grad_up / grad_down
tensor per epoch from a real run (SmolLM2-135M on E2E, one `bench/comm.py` row), then replays FULL +
DELTA chains offline with each codec pair and prints the receiver's relative error per epoch and the
bytes after zstd.

    .venv/bin/python bench/stream_codecs.py [--row ushape+all+adapter-int2] [--epochs 4] [--samples 80]

Errors are measured on the ordinary channels (all but the 8 with the largest RMS): a few massive-activation
channels would otherwise hide what a per-token absmax step does to the rest. Skips where ../shared/data/e2e
is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comm  # noqa: E402  (the rows and common settings of the comm benchmark)

from splitcom.compress import pipeline  # noqa: E402
from splitcom.compress.codecs import get_codec  # noqa: E402
from splitcom.config import build_config  # noqa: E402
from splitcom.federation.simulation import run  # noqa: E402

warnings.filterwarnings("ignore")
FULLS = ("int8", "int8o", "int4", "int4o")
DELTAS = ("int4", "int4o", "int2", "int2o", "sign1", "sign1o")


def capture(args) -> dict:
    """(stream, sample id) -> the tensor each epoch, as the sender had it before any codec."""
    seen: dict = {}
    encode = pipeline.Outgoing.encode

    def spy(self, sample_id, row, tokens=None):  # wraps the real encoder: the run itself is unchanged
        if self.stream.name != "act_up":
            seen.setdefault((self.stream.name, sample_id), []).append(row.detach().float().clone())
        return encode(self, sample_id, row, tokens)

    pipeline.Outgoing.encode = spy
    try:
        cfg = build_config({}, comm.common(args) + comm.ROWS[args.row])
        with tempfile.TemporaryDirectory() as out:
            s = run(cfg, Path(out), progress=False)
    finally:
        pipeline.Outgoing.encode = encode
    print(f"captured {args.row}, {args.epochs} epochs: val ppl {s['val_ppl']:.3f}")
    return seen


def chain(xs: list[torch.Tensor], full: str, delta: str, zstd, ordinary) -> tuple[list[float], int]:
    """FULL at the first sight, then a DELTA every epoch against the exact copy the receiver holds."""
    errs, nbytes, held = [], 0, None
    for x in xs:
        c = get_codec(full if held is None else delta)
        payload = c.encode(x if held is None else x - held)
        d = c.decode(payload, *x.shape)
        held = d if held is None else held + d
        nbytes += len(zstd.compress(payload))
        errs.append(float((x - held)[:, ordinary].norm() / x[:, ordinary].norm()))
    return errs, nbytes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", default="ushape+all+adapter-int2", choices=[r for r in comm.ROWS if r.startswith("ushape")])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--samples", type=int, default=80)
    args = ap.parse_args()
    if not (comm.E2E / "trainset.csv").exists():
        print(f"skipped: E2E not found at {comm.E2E}")
        return 0
    for k, v in dict(model="smollm2-135m", dataset="e2e", eval_samples=24, max_length=64, alpha=0.5, clients=10,
                     batch_size=8, lr=5e-4, cut=2).items():
        setattr(args, k, v)
    torch.set_num_threads(1)
    seen = capture(args)
    zstd = zstandard.ZstdCompressor(level=3)
    for stream in ("act_down", "grad_up", "grad_down"):
        keys = [k for k in seen if k[0] == stream]
        x0 = torch.cat([seen[k][0] for k in keys])
        rms = x0.pow(2).mean(0).sqrt()
        top = rms.sort(descending=True)
        ordinary = rms < top.values[8]
        drift = np.mean([float((seen[k][e] - seen[k][e - 1]).norm() / seen[k][e].norm())
                         for k in keys for e in range(1, len(seen[k]))])
        big = ", ".join(f"{float(v):.3g} (#{int(i)})" for v, i in zip(top.values[:3], top.indices[:3], strict=True))
        print(f"\n{stream}: channel RMS top 3 {big}, median {float(rms.median()):.3g}; "
              f"change between epochs {drift:.3f} of the tensor")
        print(f"  {'FULL':6} {'DELTA':7} {'error on ordinary channels, by epoch':<40} zstd MB")
        for full in FULLS:
            for delta in DELTAS:
                per = [chain(seen[k], full, delta, zstd, ordinary) for k in keys]
                errs = np.mean([p[0] for p in per], axis=0)
                nbytes = sum(p[1] for p in per)
                print(f"  {full:6} {delta:7} {' '.join(f'{e:.3f}' for e in errs):<40} {nbytes / 1e6:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
