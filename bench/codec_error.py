"""How far each codec's decoded act_up is from the tensor itself: 1 - cos, the measure temporal reuse's threshold
and the drift probe use (issue 18).

The reuse threshold bounds how stale the receiver's copy may get (0.999: 1 - cos up to 1e-3 against the
tensor it stands for). A lossy first sight puts its own error into every copy before any staleness; where
that error is ten times the threshold's allowance, refreshing for staleness buys little the codec has not
already given away. This prints median and p90 of each codec's 1 - cos on the cut layer's output for the
first training samples, per sample over its real tokens (as ``compress/temporal.cosine`` flattens them).

    .venv/bin/python bench/codec_error.py --run runs/regime8/shared+int4o+linear --samples 64

``--trained`` loads a run folder's adapter first (a trained client; default: the LoRA init, the base model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from splitcom.audit.run import load_global_adapter  # noqa: E402
from splitcom.compress.codecs import CODECS, get_codec  # noqa: E402
from splitcom.compress.temporal import cosine  # noqa: E402
from splitcom.config import load_config  # noqa: E402
from splitcom.data.tokenize import batches  # noqa: E402
from splitcom.federation.setup import prepare  # noqa: E402
from splitcom.models.split import unpad  # noqa: E402

DEFAULT = ["int8", "int8o", "int4", "int4o", "int2o", "sign1o"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run folder (its config.yaml: model, data, cut)")
    ap.add_argument("--trained", help="a run folder whose adapter/ is loaded first; none: the LoRA init")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--codecs", nargs="+", default=DEFAULT, metavar="CODEC")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    unknown = sorted(set(a.codecs) - set(CODECS))
    if unknown:
        sys.exit(f"--codecs: unknown codec(s) {unknown}; known: {sorted(CODECS)}")
    if not (Path(a.run) / "config.yaml").is_file():
        sys.exit(f"{a.run}: no config.yaml (--run takes a run folder)")
    if a.trained and not (Path(a.trained) / "adapter" / "adapter_model.safetensors").is_file():
        sys.exit(f"{a.trained}: no adapter/adapter_model.safetensors (--trained takes a run folder)")
    cfg = load_config(Path(a.run) / "config.yaml")
    s = prepare(cfg)
    if a.trained:
        load_global_adapter(s, Path(a.trained))
    sm, cut = s.split, cfg.split.cut_layer
    rows: list[torch.Tensor] = []
    with torch.no_grad():
        for b in batches(s.train[: a.samples], cfg.train.batch_size, s.pad_id):
            rows += unpad(sm.run(sm.embed(b.input_ids), b.lengths, 0, cut), b.lengths)
    print(f"act_up at cut {cut} of {cfg.model.name}, {len(rows)} training samples, adapter of "
          f"{a.trained or 'LoRA init'}\n\n| codec | median 1 - cos | p90 |\n| --- | ---: | ---: |")
    for name in a.codecs:
        c = get_codec(name)
        err = torch.tensor([1 - cosine(r, c.decode(c.encode(r), *r.shape)) for r in rows], dtype=torch.float64)
        print(f"| {name} | {err.quantile(0.5):.2e} | {err.quantile(0.9):.2e} |")


if __name__ == "__main__":
    main()
