"""The learning-regime study (issue 18, item 1): follows long `bench/comm.py` rows as they train, keeps each
finished epoch's adapter, scores it, and writes bench/results/regime.md.

    .venv/bin/python bench/regime.py [--runs runs/regime] [--rows baseline centralized] [--score 100]
                                     [--watch] [--threads 1] [--kept bench/results/regime]

A row's `adapter/` is overwritten at every epoch, so a snapshot (config.yaml + adapter/) of each finished epoch
goes to RUNS/ROW/epochs/N/ as soon as the row's checkpoint says the epoch finished; each snapshot is scored once
(beam 4 on the first --score distinct E2E dev inputs, OUT/eval/scores.json as `splitcom eval` writes it).
At a constant rate (train.lr_schedule: constant) nothing depends on the number of epochs, so epoch N of a
3-epoch row is the end of an N-epoch row: one long row gives the whole quality-against-epochs curve (not so
under a decaying schedule). With --watch it polls until every row has finished and every epoch is scored
(resumable: snapshots and scores already there are kept).

runs/ need not outlive a session (a fresh checkout has none): with --kept DIR each finished run's log (less its
step events), summary, scores, config.yaml and replayed clocks (replay.json) are copied to DIR/ROW, and a row whose
run is gone is read from there. Its time to quality needs that replay.json (rows kept before it was: none).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snapshot(row: Path) -> list[int]:
    """Copy the adapter of the epoch the checkpoint holds, if not copied yet; the epochs snapshotted so far."""
    import torch

    ckpt = row / "checkpoint.pt"
    def epoch_of() -> int:  # through mmap: a row's checkpoint is 1.5 GB, its epoch one number
        return torch.load(ckpt, weights_only=True, map_location="cpu", mmap=True)["epoch"]

    if ckpt.is_file():
        epoch = epoch_of()
        dest = row / "epochs" / str(epoch)
        if not dest.is_dir():
            tmp = dest.with_name(f".{epoch}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy(row / "config.yaml", tmp / "config.yaml")
            shutil.copytree(row / "adapter", tmp / "adapter")
            if epoch_of() == epoch:  # not overwritten since
                os.replace(tmp, dest)
            else:
                shutil.rmtree(tmp)
    return sorted(int(p.name) for p in (row / "epochs").glob("[0-9]*")) if (row / "epochs").is_dir() else []


def score(snap: Path, n: int, beams: int) -> dict:
    from dataclasses import asdict

    from splitcom.evaluate.generate import GenerationSettings, evaluate_run

    old = snap / "eval" / "scores.json"
    settings = GenerationSettings(num_beams=beams)
    if old.is_file():
        sc = json.loads(old.read_text())
        if sc.get("max_samples") == n and sc.get("generation") == asdict(settings):
            return sc
    return evaluate_run(snap, max_samples=n, settings=settings)


def evals(row: Path) -> dict[int, dict]:
    from splitcom.runlog import read_metrics

    return {e["epoch"]: e for e in read_metrics(row / "metrics.jsonl") if e["event"] == "eval"} \
        if (row / "metrics.jsonl").is_file() else {}


def _rel(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


FLEETS = {"10x jetson-orin-nx@lte": "jetson-orin-nx@lte", "mixed10": "mixed10"}
SERVER = "a100@dc-10g"  # the time-to-quality fleets' server: a data-centre GPU, as a deployment would use
HIDDEN = 576  # smollm2-135m's hidden size: the rows' tensors are [tokens, 576]
PPL_TOL = 0.01  # time to quality: the first epoch end at or below the fp32 SFL row's final val ppl + 1 %


def replayed(row: Path) -> dict[str, list[dict]]:
    """The row's clock on each FLEETS fleet (fleet/replay.py), cached in ROW/replay.json by the log's size."""
    from splitcom.fleet.replay import replay

    log = row / "metrics.jsonl"
    cache = row / "replay.json"
    key = f"{log.stat().st_size}/{SERVER}/v3"  # v3: memory estimates count the clients' stream state
    old = json.loads(cache.read_text()) if cache.is_file() else {}
    if old.get("key") != key:
        old = {"key": key, "fleets": {name: replay(row, devices=spec, server_device=SERVER)
                                      for name, spec in FLEETS.items()}}
        cache.write_text(json.dumps(old, indent=1))
    return old["fleets"]


def kept_config(kept: Path):
    """A kept row's config: its config.yaml, else (kept before config.yaml was) rebuilt by bench/comm.py's
    `row_config` from the arguments in its comm.json (tests/test_plan.py pins the rows' definitions)."""
    import ast

    from splitcom.config import load_config

    if (kept / "config.yaml").is_file():
        return load_config(kept / "config.yaml")
    sys.path.insert(0, str(ROOT / "bench"))
    import comm  # the rows and common settings of the comm benchmark, as bench/stream_codecs.py reads them

    a = json.loads((kept / "comm.json").read_text())["args"]  # comm.py's arguments, each as str()
    name = kept.name.split("@s")[0]
    if name not in ast.literal_eval(a["rows"]) or name not in comm.ROWS:
        sys.exit(f"{kept / 'comm.json'}: does not hold row {name} (rows {a['rows']}), or bench/comm.py no longer "
                 "defines it: keep its config.yaml")
    ints, floats = ("samples", "eval_samples", "max_length", "clients", "epochs", "batch_size", "cut", "seed"), \
        ("alpha", "lr")
    return comm.row_config(name, argparse.Namespace(
        model=a["model"], dataset=a["dataset"], extra=ast.literal_eval(a["extra"]),
        keep_epochs=ast.literal_eval(a.get("keep_epochs", "[]")),  # (logging: older comm.json have none)
        **{k: int(a[k]) for k in ints}, **{k: float(a[k]) for k in floats}))


def keep(row: Path, dest: Path) -> None:
    """Copy what the tables need of a finished run into ``dest`` (its bench/results folder), since runs/ need not
    outlive a session: the log without step events, summary, final scores and the texts they score (a few KB:
    later analyses of the generations need them), config.yaml and the replayed clocks (replay.json: the only
    thing the step events are read for; centralized rows have none)."""
    from splitcom.config import load_config

    summary = json.loads((row / "summary.json").read_text()) if (row / "summary.json").is_file() else {}
    if summary.get("epochs") is None:
        return  # unfinished
    fed = load_config(row / "config.yaml").federation.mode != "centralized"
    if fed and not (row / "replay.json").is_file():
        return  # its clocks not replayed yet (centralized rows have no fleet to replay)
    texts = ("eval/inputs.txt", "eval/predictions.txt")
    key = "replay.json" if fed else "summary.json"  # replay.json's key is the log's size
    if (dest / key).is_file() and (dest / key).read_bytes() == (row / key).read_bytes() \
            and all((dest / t).is_file() or not (row / t).is_file() for t in texts):
        return  # kept already (--watch passes every 2 min)
    (dest / "eval").mkdir(parents=True, exist_ok=True)
    with open(row / "metrics.jsonl") as src, open(dest / "metrics.jsonl", "w") as out:
        out.writelines(line for line in src if '"event": "step"' not in line)
    for name in ("summary.json", "config.yaml", "replay.json", "eval/scores.json", *texts):
        if (row / name).is_file():
            shutil.copy(row / name, dest / name)


def gather(row: Path, epoch: int, beams: int, n: int, kept: bool = False) -> dict | None:
    """What the tables need of one run at ``epoch`` (None while that epoch has not finished). ``kept``: ``row`` is
    what `keep` (or the manual copy before it) left in bench/results, its run gone: no step events to replay, so
    the clocks are those of its replay.json, or none."""
    from splitcom.config import load_config
    from splitcom.runlog import read_metrics

    if not (row / "metrics.jsonl").is_file():
        return None
    events = read_metrics(row / "metrics.jsonl")  # read once: evaluations and reuse events
    ev = {e["epoch"]: e for e in events if e["event"] == "eval"}
    if epoch not in ev:
        return None
    cfg = kept_config(row) if kept else load_config(row / "config.yaml")
    reuse = {e["epoch"]: e for e in events if e["event"] == "reuse"}
    summary = json.loads((row / "summary.json").read_text()) if (row / "summary.json").is_file() else {}
    sc = {}
    for where in (row / "epochs" / str(epoch) / "eval" / "scores.json", row / "eval" / "scores.json"):
        if where.is_file() and (where == row / "epochs" / str(epoch) / "eval" / "scores.json"
                                or summary.get("epochs") == epoch):
            got = json.loads(where.read_text())
            if got.get("max_samples") == n and got.get("generation", {}).get("num_beams") == beams:
                sc = got
                break
    fed = cfg.federation.mode != "centralized"
    if not fed:
        fleets = {}
    elif kept:
        fleets = json.loads((row / "replay.json").read_text())["fleets"] if (row / "replay.json").is_file() else {}
    else:
        fleets = replayed(row)
    return {"cfg": cfg, "eval": ev[epoch], "evals": ev, "reuse": reuse, "summary": summary, "scores": sc,
            "fleets": fleets, "epoch": epoch}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _spread(xs: list[float]) -> float:
    return max(xs) - min(xs) if len(xs) > 1 else float("nan")


def report(args, runs: dict[str, list[dict]]) -> None:
    """``runs``: row name -> its runs (one per seed) at the table's epoch."""
    from splitcom.compress.plan import state_bytes_per_sample, stream_plan
    from splitcom.report.tables import fmt_bytes

    E = args.epoch
    base = runs.get(args.base, [])
    mb = lambda n: f"{n / 1e6:,.1f}"  # noqa: E731
    ab = lambda r: r["eval"]["bytes_by_stream"].get("act_up", 0)  # noqa: E731
    tot = lambda r: r["eval"]["bytes_up"] + r["eval"]["bytes_down"]  # noqa: E731
    ppl = lambda r: r["eval"]["val_ppl"]  # noqa: E731
    bleu = lambda r: r["scores"].get("BLEU")  # noqa: E731
    b_act, b_tot = (_mean([ab(r) for r in base]), _mean([tot(r) for r in base])) if base else (0, 0)
    # U-shape rows send four streams: their bytes are set against fp32 U-shape (--u-base) once it has run
    u_base = runs.get(args.u_base, [])
    ushapes = {n: rs for n, rs in runs.items() if rs and rs[0]["cfg"].split.mode == "ushape"}
    if not u_base and ushapes:
        print(f"warning: --u-base {args.u_base} is not among the rows (or has not finished): U-shape rows' bytes "
              f"are set against fp32 SFL ({args.base})", file=sys.stderr)
    u_act, u_tot = (_mean([ab(r) for r in u_base]), _mean([tot(r) for r in u_base])) if u_base else (b_act, b_tot)

    def against_ushape(name: str, cfg) -> bool:
        return bool(u_base) and cfg.split.mode == "ushape" and name != args.u_base
    b_ppl = _mean([ppl(r) for r in base]) if base else float("nan")
    b_bleus = [bleu(r) for r in base if bleu(r) is not None]
    b_bleu = _mean(b_bleus) if b_bleus else None
    spread_ppl = _spread([ppl(r) for r in base]) if base else float("nan")
    spread_bleu = _spread(b_bleus) if b_bleus else float("nan")
    target = b_ppl * (1 + PPL_TOL)
    lines = [f"# Learning regime (issue 18, items 1-3; issue 21, item 3): every row at epoch {E}", "",
             f"Rows of `bench/comm.py` under `{_rel(args.runs)}` (settings below and in each run's config.yaml): "
             f"2000 E2E train samples, 10 clients (length_dirichlet 0.5, about 25 local steps per client per round), "
             f"smollm2-135m, cut 2, lr 5e-4, batch 8, max length 64, FedAvg every epoch. val ppl on the same 200 dev "
             f"samples for every row; BLEU etc. on the first {args.score} distinct E2E dev inputs (beam {args.beams}). "
             "Several seeds (`ROW@sN`: train.seed N on the same data, dev set and clients): the mean, and the spread "
             f"(max - min) in brackets. *less* is against fp32 SFL (`{args.base}`); *(U)*: against fp32 U-shape "
             f"(`{args.u_base}`, the same four streams in fp32), for U-shape rows once it has run. Δppl and ΔBLEU are "
             f"against `{args.base}` for every row.", "",
             "## Bytes and quality", "",
             "| row | seeds | act_up MB | act_up less | total MB | total less | per client per round | val ppl | "
             "Δppl | BLEU | ΔBLEU | paired Δppl / ΔBLEU | NIST | METEOR | ROUGE_L | CIDEr |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_seed = {r["cfg"].train.seed: r for r in base}
    u_by_seed = {r["cfg"].train.seed: r for r in u_base}
    for name, rs in runs.items():
        if not rs:
            continue
        a, t, p = _mean([ab(r) for r in rs]), _mean([tot(r) for r in rs]), [ppl(r) for r in rs]
        bl = [bleu(r) for r in rs if bleu(r) is not None]
        cfg = rs[0]["cfg"]
        fed = cfg.federation.mode != "centralized"
        per = t / cfg.federation.num_clients / E if fed else None
        ushape = fed and against_ushape(name, cfg)
        r_act, r_tot = (u_act, u_tot) if ushape else (b_act, b_tot)
        sp = lambda xs, f: "" if len(xs) < 2 else f" ({_spread(xs):{f}})"  # noqa: E731
        gen = lambda k, f, rs=rs: (lambda v: "-" if not v else format(_mean(v), f))(  # noqa: E731
            [r["scores"][k] for r in rs if r["scores"].get(k) is not None])
        dppl = f"{100 * (_mean(p) / b_ppl - 1):+.2f} %" if base and name != args.base else "-"
        dbleu = f"{_mean(bl) - b_bleu:+.4f}" if bl and b_bleu is not None and name != args.base else "-"
        # each seed against fp32 SFL of the same seed (same LoRA init and batch order): less noisy than the means
        def paired_with(seeds: dict, rs=rs) -> str:
            pairs = [(r, seeds[r["cfg"].train.seed]) for r in rs if r["cfg"].train.seed in seeds]
            pp = [100 * (ppl(r) / ppl(b) - 1) for r, b in pairs]
            pb = [bleu(r) - bleu(b) for r, b in pairs if bleu(r) is not None and bleu(b) is not None]
            return "-" if not pp else f"{_mean(pp):+.2f} % ({len(pp)}) / " + (
                f"{_mean(pb):+.4f} ({len(pb)})" if pb else "-")
        paired = "-" if name == args.base else paired_with(by_seed)
        if ushape:  # and against fp32 U-shape of the same seed, the U-shape goal's reference
            paired += f"; (U) {paired_with(u_by_seed)}"
        lines.append(
            f"| {name} | {len(rs)} | {mb(a) if fed else '-'} | {_red(a, r_act) if fed else '-'}{' (U)' if ushape else ''} | "
            f"{mb(t) if fed else '-'} | {_red(t, r_tot) if fed else '-'}{' (U)' if ushape else ''} | "
            f"{fmt_bytes(per) if fed else '-'} | "
            f"{_mean(p):.3f}{sp(p, '.3f')} | {dppl} | {format(_mean(bl), '.4f') + sp(bl, '.4f') if bl else '-'} | "
            f"{dbleu} | {paired} | {gen('NIST', '.3f')} | {gen('METEOR', '.4f')} | {gen('ROUGE_L', '.4f')} | "
            f"{gen('CIDEr', '.3f')} |")
    bleu_spread = f"BLEU {spread_bleu:.4f}" if len(b_bleus) > 1 else f"BLEU of {len(b_bleus)} seed scored so far"
    spread = (f"val ppl {spread_ppl:.3f} ({100 * spread_ppl / b_ppl:.2f} %), {bleu_spread} ({len(base)} seeds)"
              if len(base) > 1 else "not measured yet (one seed finished)")
    lines += ["", f"fp32 SFL seed-to-seed spread: {spread}. A row's difference from fp32 SFL counts as no quality "
              "loss only where it is within that spread. *paired*: the mean over a row's seeds of its difference "
              "from fp32 SFL of the same seed (same LoRA init and batch order; in brackets, how many seeds were paired); "
              "*(U)*: the same against fp32 U-shape.", "",
              "## What reuse does: reuse by epoch, samples sent, true drift between sightings", "",
              "Drift is 1 - cos of the act_up tensor itself between a sample's sightings in consecutive epochs "
              "(`logging.drift`, compress/drift.py): median / p90; *per channel*: the same with every channel "
              "scaled by its RMS (the massive channels no longer dominate); *stale*: against the copy the "
              "receiver holds (what a REUSE stands for); *summary*: what the 16-dim projection saw.", "",
              f"*Client cache*: what a client's stream ends hold in memory at the end (summaries, the DELTA mirror, "
              f"prompt prefixes), measured, mean per client; *at full E2E*: the same per sample, times a client's "
              f"share of all {E2E_TRAIN:,} E2E training samples (10 clients), and the fleet's upper bound for that "
              f"share (every sample data.max_length tokens long, every prompt its own: compress/plan.py "
              f"`state_bytes_per_sample`; `compression.temporal.store: disk` moves mirrors and copies to flash).", "",
              "| row | reuse by epoch | act_up FULL / DELTA / REUSE | drift median / p90 | per channel | stale | "
              "summary | client cache (mean per client) | at full E2E: measured / bound |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rs in runs.items():
        if not rs or rs[0]["cfg"].federation.mode != "sfl":
            continue
        r = rs[0]
        by = ", ".join(f"{r['reuse'][e]['reuse_ratio']:.3f}" for e in sorted(r["reuse"]) if e <= E)
        tr = r["summary"].get("transfers_by_stream", {}).get("act_up")
        counts = f"{tr['full']:,} / {tr['delta']:,} / {tr['reuse']:,}" if tr else "-"
        d = r["reuse"].get(E, {}).get("drift", {}).get("act_up", {})
        q = lambda k, d=d: f"{d[k]['median']:.4f} / {d[k]['p90']:.4f}" if k in d else "-"  # noqa: E731
        cache = r["summary"].get("client_cache_bytes")
        cfg = r["cfg"]
        n, samples = cfg.federation.num_clients, r["summary"].get("train_samples") or cfg.data.max_train_samples
        share = E2E_TRAIN / n
        bound = state_bytes_per_sample(stream_plan(cfg, "client"), HIDDEN, cfg.data.max_length) * share
        full = f"{fmt_bytes(cache / samples * share)} / {fmt_bytes(bound)}" if cache is not None and samples else "-"
        lines.append(f"| {name} | {by} | {counts} | {q('between')} | {q('between_channel')} | {q('stale')} | "
                     f"{q('summary')} | {fmt_bytes(cache / n) if cache is not None else '-'} | {full} |")
    if ushapes:
        streams = ["act_up", "act_down", "grad_up", "grad_down", "adapters"]
        by = lambda r, k: sum(v for s, v in r["eval"]["bytes_by_stream"].items()  # noqa: E731
                              if s == k or (k == "adapters" and s.startswith("adapters")))
        lines += ["", "## U-shape: bytes by stream", "",
                  f"MB per stream at the table's epoch (mean over seeds); *less*: against fp32 U-shape (`{args.u_base}`) "
                  "where it has run.", "",
                  "| row | " + " | ".join(streams) + " | total | less |", "| --- |" + " ---: |" * (len(streams) + 2)]
        for name, rs in ushapes.items():
            t = _mean([tot(r) for r in rs])
            lines.append(f"| {name} | " + " | ".join(mb(_mean([by(r, k) for r in rs])) for k in streams) +
                         f" | {mb(t)} | {_red(t, u_tot) if against_ushape(name, rs[0]['cfg']) else '-'} |")
        if u_base:
            lines += frontier({n: rs for n, rs in ushapes.items() if n != args.u_base}, u_by_seed,
                              args.out / "regime.frontier.png", args.u_base)
    lines += ["", "## Time to quality (simulated) and device memory", "",
              f"The simulated clock (fleet/clock.py) of each run replayed on two fleets (fleet/replay.py: the same "
              f"batches and the bytes each client really sent in each step and round) with an `{SERVER}` server. "
              f"*to quality*: simulated time at the first epoch end whose val ppl is at or below fp32 SFL's final "
              f"{b_ppl:.3f} + {100 * PPL_TOL:.0f} % = {target:.3f} (only epoch ends are evaluated); *all {E} epochs*: "
              f"the whole run; *Nx*: fp32 SFL's mean time over the row's mean (`{args.base}`, seeds that reach the "
              "target). Device memory: the time model's estimate, largest client (SFL: its blocks, LoRA state, "
              "activations for a batch of 8 x 64 tokens, and the upper bound of its stream state for its samples; "
              "FL: the whole model's LoRA training).", "",
              "| row | " + " | ".join(f"{f}: to quality | {f}: all {E} epochs" for f in FLEETS) +
              " | device memory (estimate) |",
              "| --- | " + " | ".join("---: | ---:" for _ in FLEETS) + " | ---: |"]

    def to_quality(rs: list, f: str) -> tuple[list[float], list[float]]:
        """Per seed with clocks (a kept row's run may be gone without its replay.json): simulated seconds to the
        target (seeds that reach it) and for all E epochs."""
        rs = [r for r in rs if r["fleets"]]
        ttq = [next((e["simulated_s"] for e in r["fleets"][f] if e["epoch"] <= E and e["val_ppl"] <= target),
                    None) for r in rs]
        return [x for x in ttq if x is not None], [next(e["simulated_s"] for e in r["fleets"][f] if e["epoch"] == E)
                                                   for r in rs]

    # *Nx*: fp32 SFL's mean time over the row's (the issue's time-to-quality goal is a ratio)
    base_t = {f: to_quality(base, f) for f in FLEETS} if base else {}
    for name, rs in runs.items():
        if not rs or rs[0]["cfg"].federation.mode == "centralized":
            continue
        cells = []
        clocked = [r for r in rs if r["fleets"]]
        for f in FLEETS:
            if not clocked:
                cells += ["no clock kept", "-"]
                continue
            reached, done = to_quality(rs, f)
            shorter = ""
            if name != args.base and reached and base_t.get(f, ([],))[0]:
                shorter = f", {_mean(base_t[f][0]) / _mean(reached):.2f}x shorter"
            gone = "" if len(clocked) == len(rs) else f"; {len(rs) - len(clocked)} without a kept clock"
            cells += [f"{_mean(reached) / 60:.2f} min" + shorter + ("" if len(reached) == len(rs) else
                      f" ({len(reached)} of {len(rs)} seeds{gone})") if reached else "not reached",
                      f"{_mean(done) / 60:.2f} min" + (f", {_mean(base_t[f][1]) / _mean(done):.2f}x" if name !=
                                                       args.base and base_t.get(f, ([], []))[1] else "")]
        # the replay's estimate is today's time model (a run's summary keeps the one it ran with)
        mem = (next(iter(clocked[0]["fleets"].values()))[-1].get("memory_estimate_bytes") if clocked else None) \
            or rs[0]["summary"].get("client_memory_estimate_bytes")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt_bytes(max(mem)) if mem else '-'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "regime.md"
    notes = out.with_suffix(".notes.md")
    extra = ["", notes.read_text()] if notes.is_file() else []
    out.write_text("\n".join(lines + extra) + "\n")


U_GOAL_LESS, BLEU_TOL = 96.0, 0.01  # issue 18's U-shape goal: total >= 96 % less than fp32 U-shape, ΔBLEU >= -0.01


def frontier(rows: dict[str, list[dict]], u_by_seed: dict[int, dict], png: Path, u_name: str) -> list[str]:
    """U-shape rows' BLEU against their bytes, each seed paired with fp32 U-shape of the same seed: a table, the
    least-squares line of paired ΔBLEU on total MB over every paired seed of every row (where it crosses the goal's
    -0.01), and the same as a plot (``png``). The rows trade the same streams in different ways, so the line is a
    summary of what was tried, not a law."""
    import statistics

    tot = lambda r: r["eval"]["bytes_up"] + r["eval"]["bytes_down"]  # noqa: E731
    points: dict[str, list[tuple[float, float, float, int]]] = {}  # row -> (MB, % less, ΔBLEU, seed) per seed
    for name, rs in rows.items():
        for r in rs:
            b = u_by_seed.get(r["cfg"].train.seed)
            if b is None or r["scores"].get("BLEU") is None or b["scores"].get("BLEU") is None:
                continue
            points.setdefault(name, []).append((tot(r) / 1e6, 100 * (1 - tot(r) / tot(b)),
                                                r["scores"]["BLEU"] - b["scores"]["BLEU"], r["cfg"].train.seed))
    if not points:
        return []
    lines = ["", "## U-shape: BLEU against bytes", "",
             f"Each seed's BLEU minus fp32 U-shape's of the same seed (`{u_name}`), against the seed's total bytes. "
             f"The goal's corner: at least {U_GOAL_LESS:g} % less and ΔBLEU >= -{BLEU_TOL:g} on the mean over seeds. "
             f"Plot: `{png.name}`.", "",
             "| row | seeds | total MB | less (U) | paired ΔBLEU by seed | mean | in the goal's corner |",
             "| --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for name, ps in sorted(points.items(), key=lambda kv: _mean([p[0] for p in kv[1]])):
        less, d = _mean([p[1] for p in ps]), _mean([p[2] for p in ps])
        ok = "yes" if less >= U_GOAL_LESS and d >= -BLEU_TOL else "no"
        lines.append(f"| {name} | {len(ps)} | {_mean([p[0] for p in ps]):.1f} | {less:.2f} % | "
                     + ", ".join(f"s{p[3]} {p[2]:+.4f}" for p in sorted(ps, key=lambda p: p[3]))
                     + f" | {d:+.4f} | {ok} |")
    every = [p for ps in points.values() for p in ps]
    u_mb = _mean([tot(u_by_seed[p[3]]) / 1e6 for p in every])  # the paired seeds' mean fp32 U-shape total: % less
    fit = None
    if len({round(p[0], 1) for p in every}) > 1:
        fit = statistics.linear_regression([p[0] for p in every], [p[2] for p in every])
        mb_at = (-BLEU_TOL - fit.intercept) / fit.slope if fit.slope > 0 else None
        lines += ["", f"Least squares over the {len(every)} paired seeds: ΔBLEU = {fit.intercept:+.4f} "
                  f"{fit.slope * 100:+.4f} per 100 MB" + (
                      f"; it reaches -{BLEU_TOL:g} at {mb_at:.0f} MB, {100 * (1 - mb_at / u_mb):.2f} % less than fp32 "
                      f"U-shape ({u_mb:,.0f} MB)." if mb_at else "; it does not rise with bytes.")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(-BLEU_TOL, color="tab:green", lw=1, ls="--", label=f"goal: ΔBLEU >= -{BLEU_TOL:g}")
    ax.axvline(U_GOAL_LESS, color="tab:green", lw=1, ls=":", label=f"goal: >= {U_GOAL_LESS:g} % less")
    ax.axhline(0, color="grey", lw=0.8)
    for name, ps in points.items():
        dots = ax.scatter([p[1] for p in ps], [p[2] for p in ps], s=14, alpha=0.5)
        ax.scatter([_mean([p[1] for p in ps])], [_mean([p[2] for p in ps])], s=70, marker="D",
                   color=dots.get_facecolor()[0], alpha=1, label=f"{name} ({len(ps)})")
    if fit is not None:
        xs = sorted(p[0] for p in every)
        ax.plot([100 * (1 - x / u_mb) for x in (xs[0], xs[-1])], [fit.intercept + fit.slope * x for x in (xs[0], xs[-1])],
                color="black", lw=1, alpha=0.6, label="least squares")
    top = max(ax.get_ylim()[1], 0.002)
    ax.fill_between([U_GOAL_LESS, max(100, ax.get_xlim()[1])], -BLEU_TOL, top, color="tab:green", alpha=0.08,
                    label="the goal's corner")
    ax.set_ylim(top=top)
    ax.set(xlabel="total bytes, % less than fp32 U-shape", ylabel="BLEU minus fp32 U-shape's (same seed)",
           title="U-shape: quality against bytes (dots: seeds; diamonds: means)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return lines


def _red(value: float, base: float) -> str:
    return f"{100 * (1 - value / base):.2f} %" if base else "-"


ORDER = ["centralized", "baseline", "baseline+linear", "shared", "temporal+int8", "all", "all+channel", "all+int4o",
         "all+grad-int4", "all+linear", "bangbang+all", "bangbang-budget+all", "ddpg+all", "ushape", "ushape+codec-map", "fl", "fl+int8-delta-zstd"]
E2E_TRAIN = 42_061  # rows of E2E's trainset.csv: a client's share of the full set is E2E_TRAIN / clients


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "regime")
    ap.add_argument("--rows", nargs="+", default=None, help="run directories under --runs (default: all)")
    ap.add_argument("--epoch", type=int, default=2, help="the epoch every row is compared at")
    ap.add_argument("--base", default="baseline", help="the fp32 SFL row every other row is compared with "
                    "(e.g. baseline+linear for rows trained under train.lr_schedule=linear)")
    ap.add_argument("--u-base", default="ushape", help="the fp32 U-shape row U-shape rows' bytes are set against "
                    "(e.g. ushape+shared+linear)")
    ap.add_argument("--score", type=int, default=100)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--watch", action="store_true", help="poll until every row has finished and is scored")
    ap.add_argument("--kept", type=Path, default=None, metavar="DIR",
                    help="bench/results folder of the rows (e.g. bench/results/regime8): a row whose run under "
                         "--runs is gone is read from DIR/ROW (eval and reuse events, summary, scores, and the "
                         "replayed clocks where replay.json was kept), and each finished run is copied there")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from splitcom.config import load_config

    while True:
        runs: dict[str, list[dict]] = {}
        busy = False
        names = args.rows or sorted({p.name for p in args.runs.glob("*") if (p / "config.yaml").is_file()} |
                                    ({p.name for p in args.kept.iterdir() if (p / "metrics.jsonl").is_file()}
                                     if args.kept else set()))
        for name in names:
            row = args.runs / name
            if not (row / "config.yaml").is_file():  # its run is gone: what bench/results kept of it
                kept = args.kept / name if args.kept else None
                if kept is None or not (kept / "metrics.jsonl").is_file():
                    sys.exit(f"{row}: no run there" + (f", and nothing kept in {kept}" if kept else
                                                       " (--kept DIR reads what bench/results keeps of a row)"))
                got = gather(kept, args.epoch, args.beams, args.score, kept=True)
                if got is not None:
                    runs.setdefault(name.split("@s")[0], []).append(got)
                continue
            longer = load_config(row / "config.yaml").train.epochs > args.epoch  # comm.py --score scores the last
            for epoch in snapshot(row):
                if epoch == args.epoch and longer:
                    sc = score(row / "epochs" / str(epoch), args.score, args.beams)
                    print(f"{name} epoch {epoch}: BLEU {sc['BLEU']:.4f}", flush=True)
            got = gather(row, args.epoch, args.beams, args.score)
            if got is not None and args.kept:
                keep(row, args.kept / name)
            busy |= got is None or not got["scores"]
            if got is not None:
                runs.setdefault(name.split("@s")[0], []).append(got)
        rank = {n: i for i, n in enumerate(ORDER)}
        report(args, dict(sorted(runs.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0]))))
        if not (args.watch and busy):
            return 0
        time.sleep(120)


if __name__ == "__main__":
    sys.exit(main())
