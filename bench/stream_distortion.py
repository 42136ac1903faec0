"""Which stream's codec costs quality: one batch's loss and LoRA gradients with each stream's first-sight
codec applied alone, against the exact split (issue 18, U-shape).

A U-shape step sends four tensors per sample: act_up (block cut-1's output), act_down (the server's last
block's output), grad_up (the gradient at act_down) and grad_down (the gradient at act_up). This script runs
the split model as simulation does (SplitModel slices), but passes each stream through a codec's
encode/decode in place, one stream at a time and all together, and reports per configuration:

- *loss*: relative change of the batch loss (the forward streams act_up, act_down only);
- *cos head / server / tail*: cosine between the LoRA gradient of that part of the model and the exact one;
- *norm*: relative error of the whole LoRA gradient's norm.

Cheap (a few forward/backward passes per configuration) where a training row costs an hour; a distortion
measure, not a quality result: the rows of bench/comm.py say what training makes of it.

    .venv/bin/python bench/stream_distortion.py --run runs/regime/ushape+codec-map \\
        --trained runs/regime/baseline --batches 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from splitcom.audit.run import load_global_adapter  # noqa: E402
from splitcom.compress.codecs import get_codec  # noqa: E402
from splitcom.config import load_config  # noqa: E402
from splitcom.data.tokenize import batches  # noqa: E402
from splitcom.federation.setup import prepare  # noqa: E402
from splitcom.models.adapters import GLOBAL  # noqa: E402
from splitcom.models.split import causal_lm_loss, layer_index, pad, unpad  # noqa: E402

STREAMS = ("act_up", "act_down", "grad_up", "grad_down")
# configurations: name -> codec by stream (absent: exact)
CODEC_MAP = {"act_up": "int8", "act_down": "int8o", "grad_up": "int8", "grad_down": "int2"}
CONFIGS: dict[str, dict[str, str]] = {
    "exact": {},
    **{f"{s} {c}": {s: c} for s, c in CODEC_MAP.items()},
    "codec-map (all four)": CODEC_MAP,
    "act_down int4o": {"act_down": "int4o"},
    "act_down int8": {"act_down": "int8"},
    "grad_up int8o": {"grad_up": "int8o"},
    "grad_up int4o": {"grad_up": "int4o"},
    "grad_up int4": {"grad_up": "int4"},
    "grad_down int4": {"grad_down": "int4"},
    "grad_down int8": {"grad_down": "int8"},
    "act_up int4o": {"act_up": "int4o"},
    # stochastic rounding: unbiased, so the error averages out over steps where nearest rounding's does not
    "grad_down int2s": {"grad_down": "int2s"},
    "grad_down int4s": {"grad_down": "int4s"},
    "grad_up int2s": {"grad_up": "int2s"},
    "grad_up int4s": {"grad_up": "int4s"},
    "grad_up int2": {"grad_up": "int2"},
}


def roundtrip(x: torch.Tensor, codec: str | None, lengths: list[int]) -> torch.Tensor:
    """What the receiver decodes: each sample's real tokens through the codec, pad rows zero."""
    if codec is None:
        return x
    c = get_codec(codec)
    rows = [c.decode(c.encode(r), r.shape[0], r.shape[1]).to(x.dtype) for r in unpad(x.detach(), lengths)]
    return pad(rows, x.shape[1]).to(x.device)


class Wire(torch.autograd.Function):
    """Forward: the activation as received; backward: the gradient as received."""

    @staticmethod
    def forward(ctx, x, fwd, bwd, lengths):
        ctx.bwd, ctx.lengths = bwd, lengths
        return roundtrip(x, fwd, lengths)

    @staticmethod
    def backward(ctx, g):
        return roundtrip(g, ctx.bwd, ctx.lengths), None, None, None


def step(s, batch, cut: int, tail: int, codecs: dict[str, str]) -> tuple[float, dict[str, torch.Tensor]]:
    sm, model = s.split, s.split.model
    model.zero_grad(set_to_none=True)
    lengths = batch.lengths
    h = sm.run(sm.embed(batch.input_ids), lengths, 0, cut)
    h = Wire.apply(h, codecs.get("act_up"), codecs.get("grad_down"), lengths)
    h = sm.run(h, lengths, cut, sm.num_layers - tail)
    h = Wire.apply(h, codecs.get("act_down"), codecs.get("grad_up"), lengths)
    h = sm.run(h, lengths, sm.num_layers - tail, sm.num_layers)
    loss = causal_lm_loss(sm.logits(h), batch.labels)
    loss.backward()
    parts: dict[str, list[torch.Tensor]] = {"head": [], "server": [], "tail": []}
    for name, p in model.named_parameters():
        if p.grad is None or "lora_" not in name:
            continue
        i = layer_index(name)
        part = "head" if i < cut else "tail" if i >= sm.num_layers - tail else "server"
        parts[part].append(p.grad.detach().reshape(-1).double())  # fp64: a cosine over ~10^6 values
    return float(loss), {k: torch.cat(v) for k, v in parts.items() if v}


def adapter_table(s, a, init: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], cut: int,
                  tail: int) -> list[str]:
    """Val ppl of the trained adapter when the client's blocks (head, tail) reach the server through an adapter
    codec as a delta from the LoRA init (with adapter_refresh: delta, a client's first upload is that delta),
    on the first --val-samples dev samples."""
    from splitcom.evaluate.perplexity import evaluate_loss
    from splitcom.protocol.serde import adapter_roundtrip

    n, val = s.split.num_layers, s.val[: a.val_samples]

    def ppl(state) -> float:
        s.bank.load(GLOBAL, state)
        return evaluate_loss(s.split, s.bank, val, s.cfg.train.batch_size, s.pad_id)[1]

    exact = ppl(trained)
    lines = ["", "## Adapter codecs: the client blocks' first upload as a delta from the LoRA init", "",
             f"val ppl on the first {len(val)} dev samples with the adapter as the server decodes it; exact: "
             f"{exact:.4f}.", "", "| blocks | int8 | int4 | int2 | sign1 |", "| --- | ---: | ---: | ---: | ---: |"]
    parts = {"head": set(range(cut)), "tail": set(range(n - tail, n)), "head + tail": set(range(cut)) | set(range(n - tail, n))}
    for name, blocks in parts.items():
        cells = []
        for codec in ("int8", "int4", "int2", "sign1"):
            q = {k: init[k] + adapter_roundtrip(v - init[k], codec) if layer_index(k) in blocks else v
                 for k, v in trained.items()}
            cells.append(f"{100 * (ppl(q) / exact - 1):+.3f} %")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a U-shape run folder (its config.yaml: model, data, cut)")
    ap.add_argument("--trained", help="a run folder whose adapter/ is loaded first (a trained state); none: LoRA init")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--val-samples", type=int, default=96, help="dev samples for the adapter-codec table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the table here (markdown) as well as printing it")
    ap.add_argument("--streams-only", action="store_true", help="skip the adapter-codec table (about 20 min)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"these configurations only (of: {', '.join(CONFIGS)})")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(Path(a.run) / "config.yaml")
    cut, tail = cfg.split.cut_layer, cfg.split.tail_layers if cfg.split.mode == "ushape" else 0
    if tail == 0:
        sys.exit(f"{a.run}: split.mode is {cfg.split.mode}; this script measures the four U-shape streams")
    if a.trained and not (Path(a.trained) / "adapter" / "adapter_model.safetensors").is_file():
        sys.exit(f"{a.trained}: no adapter/adapter_model.safetensors (--trained takes a run folder)")
    unknown = sorted(set(a.only or []) - set(CONFIGS))
    if unknown:
        sys.exit(f"--only: unknown configuration(s) {unknown}; known: {list(CONFIGS)}")
    s = prepare(cfg)
    # the LoRA init of this run: what the server first sends down, and what a first upload is a delta from
    init = s.bank.state(GLOBAL)
    if a.trained:
        load_global_adapter(s, Path(a.trained))
    data = batches(s.train[: a.batches * cfg.train.batch_size], cfg.train.batch_size, s.pad_id)
    exact = [step(s, b, cut, tail, {}) for b in data]
    lines = [f"# Stream distortion: `{a.run}`, adapter of `{a.trained or 'LoRA init'}`, {len(data)} batches of "
             f"{cfg.train.batch_size}", "",
             "| codecs | loss | cos head | cos server | cos tail | norm | cos head, sum over batches |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    exact_sum = sum(e[1]["head"] for e in exact)
    for name, codecs in CONFIGS.items():
        if a.only and name not in a.only and name != "exact":
            continue
        rows = [step(s, b, cut, tail, codecs) for b in data]
        # a biased error keeps its cosine as batches add up; an unbiased one averages out
        cos_sum = float(torch.nn.functional.cosine_similarity(sum(r[1]["head"] for r in rows), exact_sum, dim=0))
        dl = sum(abs(r[0] - e[0]) / e[0] for r, e in zip(rows, exact, strict=True)) / len(data)
        cos = {k: sum(float(torch.nn.functional.cosine_similarity(r[1][k], e[1][k], dim=0))
                      for r, e in zip(rows, exact, strict=True)) / len(data) for k in exact[0][1]}
        norm = sum(abs(float(torch.cat(list(r[1].values())).norm() / torch.cat(list(e[1].values())).norm()) - 1)
                   for r, e in zip(rows, exact, strict=True)) / len(data)
        lines.append(f"| {name} | {dl:.2e} | {cos.get('head', float('nan')):.5f} | {cos['server']:.5f} | "
                     f"{cos.get('tail', float('nan')):.5f} | {norm:.2e} | {cos_sum:.5f} |")
        print(lines[-1], flush=True)
    if a.trained and not a.streams_only:
        lines += adapter_table(s, a, init, s.bank.state(GLOBAL), cut, tail)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
