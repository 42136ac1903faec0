"""Does a sample's last DELTA predict its next one? (issue 18: could predictive coding cut U-shape refreshes?)

A U-shape row with every act_up reused still refreshes act_down and grad_up at every sighting (int4o / int4
DELTAs, about 54 MB an epoch), because the shared server's adapters keep moving. If a tensor moved the same way
epoch after epoch, both ends could extrapolate the receiver's copy (``copy + alpha * last step``) and send only
the residual, in fewer bits. This reads three checkpoints of one run, taken after three consecutive epochs, with
the drift probe on (``logging.drift=true``: each sender keeps every sample's exact tensor of its last sighting)
and prints, per stream, over a sample of rows:

- *relative drift*: |x3 - x2| / |x3|, how far the tensor moved in the last epoch;
- *cos of successive steps*: cos(x3 - x2, x2 - x1);
- *residual*: |d - alpha d_prev|^2 / |d|^2 with the best alpha per sample (1 - cos^2): what prediction leaves;
- each codec's error on the DELTA (and on the residual), as a fraction of |d|^2;
- *shared basis*: the DELTA rows of every sampled sample pooled, the share of held-out rows' energy in the top-k
  principal directions of the other rows (could one basis per epoch plus k coefficients a row replace int4?).

A checkpoint is overwritten every epoch (os.replace), so keep each one by a hard link while the row trains, e.g.
``ln runs/regime8/ROW/checkpoint.pt runs/ck/e2.pt`` after epoch 2, then

    .venv/bin/python bench/delta_prediction.py runs/ck/e1.pt runs/ck/e2.pt runs/ck/e3.pt \
        --out bench/results/regime8/delta_prediction.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from splitcom.compress.codecs import _Int, get_codec

INT3 = _Int("int3", 0, 3)  # not a wire codec (it packs like int4 here): only its rounding error is measured
CODECS = [("int4o", get_codec("int4o")), ("int4", get_codec("int4")), ("int3", INT3), ("int2o", get_codec("int2o"))]


def load(path: Path) -> dict:
    if not path.is_file():
        sys.exit(f"error: {path}: no such checkpoint")
    ck = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if "server" not in ck or "caches" not in ck["server"]:
        sys.exit(f"error: {path}: not a simulation checkpoint with stream caches (splitcom run's OUT/checkpoint.pt)")
    return ck


def seen(ck: dict, stream: str, path: Path) -> dict[tuple, torch.Tensor]:
    """Every sample's exact tensor at its last sighting, from the drift probe of the ends that send ``stream``."""
    server = list(ck["server"]["caches"].items())
    # the side whose ends hold "<stream>/out" sends it (compress/pipeline.py cache_state)
    ends = server if any(f"{stream}/out" in c for _, c in server) else [
        (i, c["caches"]) for i, c in enumerate(ck["clients"])]
    out = {}
    for who, caches in ends:
        end = caches.get(f"{stream}/out")
        if end is None:
            return {}
        if end.get("drift") is None:
            sys.exit(f"error: {path}: {stream} has no drift probe: train with --set logging.drift=true")
        out.update({(who, sid): x for sid, x in end["drift"]["seen"].items()})
    return out


def error(codec, x: torch.Tensor) -> float:
    return float((codec.decode(codec.encode(x), *x.shape) - x).pow(2).sum())


def analyse(cks: list[dict], paths: list[Path], stream: str, samples: int) -> tuple[dict, dict] | None:
    """(measures by name, shared basis) over every `samples`-th sample seen in all three checkpoints."""
    s = [seen(ck, stream, p) for ck, p in zip(cks, paths, strict=True)]
    keys = sorted(k for k in s[0] if k in s[1] and k in s[2] and s[0][k].shape == s[1][k].shape == s[2][k].shape)
    if not keys:
        return None
    rows: dict[str, list[float]] = {}
    pooled = []
    for k in keys[:: max(1, len(keys) // samples)]:
        x1, x2, x3 = (d[k].float() for d in s)
        prev, d = x2 - x1, x3 - x2
        pooled.append(d)
        n2 = float(d.pow(2).sum())
        if n2 == 0 or float(prev.pow(2).sum()) == 0:
            continue
        cos = float((prev * d).sum() / (prev.norm() * d.norm()))
        r = d - float((prev * d).sum() / prev.pow(2).sum()) * prev
        got = {"relative drift": float(d.norm() / x3.norm()), "cos of successive steps": cos,
               "residual": float(r.pow(2).sum()) / n2,
               **{f"{n} on DELTA": error(c, d) / n2 for n, c in CODECS},
               **{f"{n} on residual": error(c, r) / n2 for n, c in CODECS}}
        for name, v in got.items():
            rows.setdefault(name, []).append(v)
    return rows, shared_basis(torch.cat(pooled)) if pooled else {}


def shared_basis(d: torch.Tensor, ks=(16, 64, 128, 256)) -> dict:
    """Share of the held-out (odd) rows' energy in the top-k principal directions of the even rows."""
    fit, held = d[::2], d[1::2]
    total = float(held.pow(2).sum())
    if total == 0:
        return {}
    vh = torch.linalg.svd(fit, full_matrices=False).Vh
    return {"hidden": d.shape[1],
            "share": {k: float((held @ vh[:k].T).pow(2).sum()) / total for k in ks if k <= vh.shape[0]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", type=Path, nargs=3, help="one run's checkpoints after epochs e, e+1, e+2")
    ap.add_argument("--streams", nargs="+", default=["act_down", "grad_up", "act_up", "grad_down"])
    ap.add_argument("--samples", type=int, default=400, help="rows measured per stream (evenly spaced)")
    ap.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = ap.parse_args()
    cks = [load(p) for p in args.checkpoints]
    epochs = [ck.get("epoch") for ck in cks]
    if any(b != a + 1 for a, b in zip(epochs, epochs[1:], strict=False)):
        sys.exit(f"error: the checkpoints are after epochs {epochs}; give three consecutive epochs in order")
    lines = [f"# Successive DELTAs: epochs {epochs[0]} to {epochs[2]} of one run",
             "", f"Checkpoints: {', '.join(f'`{p}`' for p in args.checkpoints)}. Median (p10, p90) over sampled rows; "
             "codec errors as a fraction of the DELTA's energy |x3 - x2|^2.", ""]
    for stream in args.streams:
        got = analyse(cks, args.checkpoints, stream, args.samples)
        if got is None:
            continue
        rows, basis = got
        if not rows:  # e.g. act_up under reuse: the sender's tensor did not move (x2 = x1 or x3 = x2)
            lines += [f"## {stream}", "", "No sampled row moved in both epochs.", ""]
            continue
        lines += [f"## {stream} ({len(next(iter(rows.values())))} samples)", "", "| measure | median | p10 | p90 |",
                  "| --- | ---: | ---: | ---: |"]
        for name, v in rows.items():
            v = sorted(v)
            lines.append(f"| {name} | {statistics.median(v):.4g} | {v[len(v) // 10]:.4g} | {v[9 * len(v) // 10]:.4g} |")
        if basis:
            lines += ["", "Shared basis: held-out energy in the top k principal directions: "
                      + ", ".join(f"k={k}: {v:.3f}" for k, v in basis["share"].items())
                      + f" (of {basis['hidden']} channels)"]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
