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

With ``--previous`` (the adapter one epoch before ``--trained``) it adds the refreshes: each stream sent as a
DELTA against, or REUSEd from, the receiver's copy of the tensor one epoch earlier, and what each DELTA sends
after zstd. With ``--budget`` it adds what each stream's first sight costs under each codec after zstd, and how
low-rank each stream is:

    .venv/bin/python bench/stream_distortion.py --run runs/regime8/shared+linear \
        --set split.mode=ushape split.tail_layers=2 --trained runs/regime8/shared+linear --batches 3 \
        --streams-only --budget --only "grad_down int4" "grad_down int2o" "grad_down rank16" ...
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
from splitcom.errors import UserError  # noqa: E402
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
    # below 4 bits with the heavy tail taken out, and low rank (--budget says what each costs after zstd)
    "grad_down int2o": {"grad_down": "int2o"},
    "grad_down sign1o": {"grad_down": "sign1o"},
    "grad_up int2o": {"grad_up": "int2o"},
    "grad_up sign1o": {"grad_up": "sign1o"},
    **{f"{s} rank{r}": {s: f"rank{r}"} for s in ("grad_down", "grad_up") for r in (4, 8, 16)},
}
BUDGET_CODECS = ("int8", "int4", "int4o", "int2", "int2o", "sign1o")
RANKS = (4, 8, 16)


def low_rank(r: int):
    """A what-if, not a codec of the library: each sample's [T, H] tensor as its rank-r SVD, the factors in
    fp16 ((T + H) * r * 2 bytes). PowerSGD-style compression of the cut gradients, measured before building."""
    def f(x, lengths):
        rows = []
        for z in unpad(x.detach().float(), lengths):
            u, sv, v = torch.linalg.svd(z, full_matrices=False)
            rows.append(((u[:, :r] * sv[:r]).half().float() @ v[:r].half().float()).to(x.dtype))
        return pad(rows, x.shape[1]).to(x.device)
    return f


def roundtrip(x: torch.Tensor, codec, lengths: list[int]) -> torch.Tensor:
    """What the receiver decodes: each sample's real tokens through the codec, pad rows zero. ``codec`` may
    also be a function (x, lengths) -> what the receiver holds (a refresh, a reuse, a recording)."""
    if codec is None:
        return x
    if callable(codec):
        return codec(x, lengths)
    if codec.startswith("rank"):
        return low_rank(int(codec[4:]))(x, lengths)
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


# refreshes (issue 18, U-shape): the receiver holds the sample's tensor from one epoch earlier, decoded from
# its FULL codec; name -> stream, FULL codec, then the DELTA codec of the residual, or None: a REUSE of the copy
REFRESHES: dict[str, tuple[str, str, str | None]] = {
    "act_up REUSE": ("act_up", "int4o", None),
    "act_up DELTA int2": ("act_up", "int4o", "int2"),
    "act_up DELTA int4": ("act_up", "int4o", "int4"),
    "act_up DELTA sign1o": ("act_up", "int4o", "sign1o"),
    "act_down REUSE": ("act_down", "int4o", None),
    "act_down DELTA int2o": ("act_down", "int4o", "int2o"),
    "act_down DELTA int4o": ("act_down", "int4o", "int4o"),
    # below int4o for act_down's refreshes (U-shape's largest stream after epoch 1 when every act_up is reused)
    "act_down DELTA sign1o": ("act_down", "int4o", "sign1o"),
    "grad_up REUSE": ("grad_up", "int4o", None),
    "grad_up DELTA int4": ("grad_up", "int4o", "int4"),
    "grad_up DELTA int2o": ("grad_up", "int4o", "int2o"),
    "grad_up DELTA sign1o": ("grad_up", "int4o", "sign1o"),
    "grad_down REUSE": ("grad_down", "int4", None),
    "grad_down DELTA int4": ("grad_down", "int4", "int4"),
}


def record(store: dict[str, torch.Tensor], key: str):
    def f(x, lengths):
        store[key] = x.detach().clone()
        return x
    return f


def refresh(prev: torch.Tensor, full: str, delta: str | None, sent: list[int] | None = None):
    """What the receiver holds after a refresh: its copy (``prev`` as ``full`` decoded it) plus the decoded
    residual against that copy (the sender's mirror is that copy), or the copy alone (a REUSE). ``sent`` adds
    up [bytes of the DELTA after zstd (one batch a message, as serde frames it), bytes of the fp32 tensor]."""
    def f(x, lengths):
        copy = roundtrip(prev, full, lengths)
        if delta is None and sent is None:
            return copy  # a REUSE of the copy: nothing to count or encode
        residual = unpad((x - copy).detach(), lengths)
        if sent is not None:
            sent[1] += sum(4 * r.numel() for r in residual)
        if delta is None:
            return copy
        c = get_codec(delta)
        payloads = [c.encode(r) for r in residual]  # encoded once: counted, then decoded as the receiver does
        if sent is not None:
            sent[0] += len(_zstd().compress(b"".join(payloads)))
        rows = [c.decode(b, r.shape[0], r.shape[1]).to(x.dtype) for b, r in zip(payloads, residual, strict=True)]
        return copy + pad(rows, x.shape[1]).to(x.device)
    return f


def _zstd():
    import zstandard

    from splitcom.protocol.serde import ZSTD_LEVEL

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL)


def compare(name: str, rows: list, exact: list) -> str:
    """One table line: loss change, LoRA-gradient cosines by part, norm error, cosine of the summed head
    gradient (a biased error keeps its cosine as batches add up; an unbiased one averages out)."""
    n = len(exact)
    dl = sum(abs(r[0] - e[0]) / e[0] for r, e in zip(rows, exact, strict=True)) / n
    cos = {k: sum(float(torch.nn.functional.cosine_similarity(r[1][k], e[1][k], dim=0))
                  for r, e in zip(rows, exact, strict=True)) / n for k in exact[0][1]}
    norm = sum(abs(float(torch.cat(list(r[1].values())).norm() / torch.cat(list(e[1].values())).norm()) - 1)
               for r, e in zip(rows, exact, strict=True)) / n
    cos_sum = float(torch.nn.functional.cosine_similarity(sum(r[1]["head"] for r in rows),
                                                          sum(e[1]["head"] for e in exact), dim=0))
    return (f"| {name} | {dl:.2e} | {cos.get('head', float('nan')):.5f} | {cos['server']:.5f} | "
            f"{cos.get('tail', float('nan')):.5f} | {norm:.2e} | {cos_sum:.5f} |")


HEADER = ["| codecs | loss | cos head | cos server | cos tail | norm | cos head, sum over batches |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]


def refresh_table(s, a, data, cut: int, tail: int, exact: list) -> list[str]:
    """Each stream's refresh (or reuse) alone, the receiver holding what --previous's adapter produced."""
    current = s.bank.state(GLOBAL)
    load_global_adapter(s, Path(a.previous))
    prev: list[dict[str, torch.Tensor]] = [{} for _ in data]
    for b, store in zip(data, prev, strict=True):
        step(s, b, cut, tail, {k: record(store, k) for k in STREAMS})
    s.bank.load(GLOBAL, current)
    lines = ["", f"## Refreshes: the receiver holds each sample's tensor from `{a.previous}`'s adapter", "",
             "Each stream alone; its copy is that tensor through the FULL codec named, a REUSE keeps the copy, "
             "a DELTA adds the decoded residual (exact first: loss and cosines against the exact split). *sent*: "
             "the DELTA's bytes after zstd, % of the fp32 tensor (a REUSE sends none).", "",
             HEADER[0] + " sent |", HEADER[1] + " ---: |"]
    for name, (stream, full, delta) in REFRESHES.items():
        sent = [0, 0]
        rows = [step(s, b, cut, tail, {stream: refresh(p[stream], full, delta, sent)})
                for b, p in zip(data, prev, strict=True)]
        lines.append(compare(f"{name} (copy {full})", rows, exact) + f" {100 * sent[0] / sent[1]:.2f} |")
        print(lines[-1], flush=True)
    return lines


def budget_table(s, data, cut: int, tail: int) -> list[str]:
    """What each stream costs a first sight under each codec once zstd has run over a batch's payloads (one
    message a batch, as serde frames it), in % of the fp32 payload; and how much of each sample's energy its
    rank-r SVD keeps (the low-rank what-if's bytes are its fp16 factors, zstd'd alike)."""
    z = _zstd()
    store: dict[str, torch.Tensor] = {}
    for i, b in enumerate(data):
        step(s, b, cut, tail, {k: record(store, f"{k} {i}") for k in STREAMS})
    cols = [*BUDGET_CODECS, *(f"rank{r}" for r in RANKS)]
    lines = ["", "## Bytes of a first sight after zstd, % of fp32 (one batch a message); energy kept by rank r", "",
             "| stream | " + " | ".join(cols) + " | " + " | ".join(f"energy r{r}" for r in RANKS) + " |",
             "| --- |" + " ---: |" * (len(cols) + len(RANKS))]
    for k in STREAMS:
        fp32, sent, energy = 0, dict.fromkeys(cols, 0), {r: [] for r in RANKS}
        for i, b in enumerate(data):
            rows = unpad(store[f"{k} {i}"].float(), b.lengths)
            fp32 += sum(4 * r.numel() for r in rows)
            for c in BUDGET_CODECS:
                sent[c] += len(z.compress(b"".join(get_codec(c).encode(r) for r in rows)))
            for r in RANKS:
                parts = []
                for x in rows:
                    u, sv, v = torch.linalg.svd(x, full_matrices=False)
                    parts.append((u[:, :r] * sv[:r]).half().numpy().tobytes() + v[:r].half().numpy().tobytes())
                    energy[r].append(float((sv[:r] ** 2).sum() / (sv ** 2).sum()))
                sent[f"rank{r}"] += len(z.compress(b"".join(parts)))
        lines.append(f"| {k} | " + " | ".join(f"{100 * sent[c] / fp32:.2f}" for c in cols) + " | "
                     + " | ".join(f"{sum(e) / len(e):.3f}" for e in energy.values()) + " |")
        print(lines[-1], flush=True)
    return lines


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
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of that config.yaml, e.g. "
                    "split.mode=ushape split.tail_layers=2 to measure an SFL run's settings as U-shape")
    ap.add_argument("--trained", help="a run folder whose adapter/ is loaded first (a trained state); none: LoRA init")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--val-samples", type=int, default=96, help="dev samples for the adapter-codec table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the table here (markdown) as well as printing it")
    ap.add_argument("--streams-only", action="store_true", help="skip the adapter-codec table (about 20 min)")
    ap.add_argument("--previous", help="a run folder (or epochs/N of one) whose adapter/ is the state one epoch "
                    "before --trained: adds the refresh table (DELTA and REUSE against that epoch's tensors)")
    ap.add_argument("--budget", action="store_true", help="add the bytes table: each stream's first sight under "
                    "each codec after zstd, and the energy a rank-r SVD keeps")
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"these configurations only (of: {', '.join(CONFIGS)})")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    try:
        cfg = load_config(Path(a.run) / "config.yaml", a.set)
    except UserError as err:
        sys.exit(f"{a.run}/config.yaml with --set {' '.join(a.set)}: {err}")
    cut, tail = cfg.split.cut_layer, cfg.split.tail_layers if cfg.split.mode == "ushape" else 0
    if tail == 0:
        sys.exit(f"{a.run}: split.mode is {cfg.split.mode}; this script measures the four U-shape streams")
    for flag, run in (("--trained", a.trained), ("--previous", a.previous)):
        if run and not (Path(run) / "adapter" / "adapter_model.safetensors").is_file():
            sys.exit(f"{run}: no adapter/adapter_model.safetensors ({flag} takes a run folder)")
    if a.previous and not a.trained:
        sys.exit("--previous needs --trained (the state one epoch later)")
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
             f"{cfg.train.batch_size}", "", *HEADER]
    for name, codecs in CONFIGS.items():
        if a.only and name not in a.only and name != "exact":
            continue
        lines.append(compare(name, [step(s, b, cut, tail, codecs) for b in data], exact))
        print(lines[-1], flush=True)
    if a.budget:
        lines += budget_table(s, data, cut, tail)
    if a.previous:
        lines += refresh_table(s, a, data, cut, tail, exact)
    if a.trained and not a.streams_only:
        lines += adapter_table(s, a, init, s.bank.state(GLOBAL), cut, tail)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
