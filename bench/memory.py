"""Memory of one deployed client: a `splitcom server` process and one client process over gRPC loopback, with
the real SmolLM2-135M on E2E, for federated LoRA (the whole model on the device), SFL at cut 2 (fp32, and
with every compression stage of bench/comm.py's `all`) and U-shape (2 tail blocks); writes
bench/results/memory.md (and .json).

    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py [--samples 24] [--rows fl sfl all ushape]
                                                        [--checkpoints fp32 bf16] [--before SRC]

Two checkpoints of the same model: ``fp32``, the alias's cache (fp32 safetensors, which torch memory-maps:
a weight is resident only once something reads it, so blocks a client never runs cost it little even when
loaded), and ``bf16``, those weights saved in bf16 (as the Hub ships SmolLM2) and so converted to fp32 at
load: every loaded weight is a copy in the process's own memory, as on any load that converts, or that
moves the model to a GPU.

Per row: the client process's peak RSS (VmHWM), its RSS just before it loaded the model (the python,
torch and gRPC runtime, imports done), the difference (what the model, its adapters, optimizer state,
activations and caches cost), its RSS at the end of the run, and the time model's estimate of the client's
memory (the server's summary, ``client_memory_estimate_bytes``: weights, LoRA + AdamW state, activations).
``--before SRC`` runs every row once more with the code in SRC (a ``src`` directory, e.g. the commit before a
change, unpacked with ``git archive``) and adds its peak RSS.

The client runs in a process of its own (``python -c``: ``ClientDriver(...).run()``, what `splitcom client`
runs, its summary dumped as JSON). Skips with a message where ../shared/data/e2e is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e"
MB = 1e6
TOKEN = "memory-bench-token-0"
T = "compression.temporal"
# bench/comm.py's ALL: reuse at 0.999, int8 activations, residual refreshes, shared prompt prefixes, zstd,
# int8 adapters sent as deltas (a copy: comm.py is a script, not a module)
ALL = [f"{T}.enabled=true", f"{T}.threshold=0.999", "compression.codec=int8", f"{T}.refresh=delta",
       "compression.prefix=true", "compression.entropy=zstd", "compression.adapter_codec=int8",
       "compression.adapter_refresh=delta"]
ROWS: dict[str, tuple[str, list[str]]] = {
    "fl": ("federated LoRA, fp32 (whole model)", ["federation.mode=fl"]),
    "sfl": ("SFL cut 2, fp32", []),
    "all": ("SFL cut 2, all compression", ALL),
    "ushape": ("U-shape cut 2 + 2 tail blocks, fp32", ["split.mode=ushape", "split.tail_layers=2"]),
}
CHECKPOINTS = {"fp32": "fp32 checkpoint (the alias's cache; memory-mapped)",
               "bf16": "bf16 checkpoint (converted to fp32 at load: every loaded weight resident)"}
CLIENT = """import json, sys
from splitcom.deploy.client import ClientDriver, ClientOptions
summary = ClientDriver(ClientOptions(sys.argv[1], 0, sys.argv[2], reconnect_s=600)).run()
open(sys.argv[3], "w").write(json.dumps(summary))
"""


def overrides(args, row: str, model: str) -> list[str]:
    return [f"model.name={model}", f"data.dataset=e2e:{E2E}", f"data.max_train_samples={args.samples}",
            f"data.max_eval_samples={args.eval_samples}", f"data.max_length={args.max_length}",
            f"train.batch_size={args.batch_size}", "train.epochs=1", "federation.num_clients=1",
            f"split.cut_layer={args.cut}", "logging.progress=false", *ROWS[row][1]]


def run_row(args, row: str, src: Path, model: str) -> dict:
    """One row with the code in ``src`` and this model: server and client processes; the client's summary,
    the server's estimate and the client's wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(src.resolve()), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory(prefix=f"splitcom-memory-{row}-") as tmp:
        tmp = Path(tmp)
        (tmp / "tokens.yaml").write_text(yaml.safe_dump({0: TOKEN}))
        out, logs = tmp / "out", [(tmp / "server.log").open("w"), (tmp / "client.log").open("w")]
        sets = [a for o in overrides(args, row, model) for a in ("--set", o)]
        server = subprocess.Popen([sys.executable, "-m", "splitcom.cli", "server", "--bind", "127.0.0.1:0",
                                   "--tokens", "tokens.yaml", "--out", str(out), *sets], cwd=tmp, env=env,
                                  stdout=logs[0], stderr=subprocess.STDOUT)
        try:
            endpoint = out / "server.json"
            while not (endpoint.is_file() and json.loads(endpoint.read_text())["pid"] == server.pid):
                if server.poll() is not None:
                    raise RuntimeError(f"server of row {row} exited:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(0.2)
            t0 = time.perf_counter()
            client = subprocess.run([sys.executable, "-c", CLIENT, json.loads(endpoint.read_text())["address"],
                                     TOKEN, str(tmp / "client.json")], cwd=tmp, env=env, stdout=logs[1],
                                    stderr=subprocess.STDOUT, timeout=args.timeout)
            wall = time.perf_counter() - t0
            if client.returncode != 0 or server.wait(args.timeout) != 0:
                raise RuntimeError(f"row {row} failed:\n{(tmp / 'client.log').read_text()[-3000:]}\n"
                                   f"{(tmp / 'server.log').read_text()[-3000:]}")
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
            for f in logs:
                f.close()
        summary = json.loads((out / "summary.json").read_text())
        return {**json.loads((tmp / "client.json").read_text()), "client_wall_s": wall,
                "estimate_bytes": summary["client_memory_estimate_bytes"][0], "val_loss": summary["val_loss"],
                "server_peak_rss_bytes": summary["peak_rss_bytes"]}


BF16 = """import sys, torch
from splitcom.models.load import load_model
m, tok = load_model(sys.argv[1])
m.to(torch.bfloat16).save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
"""


def bf16_copy(model: str, where: Path) -> Path:
    """The model saved in bf16 (with its tokenizer) under ``where``; in a process of its own, so that this one
    stays small (a child's getrusage peak includes its parent's, which the code before VmHWM reported)."""
    env = dict(os.environ, PYTHONPATH=str((ROOT / "src").resolve()), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", BF16, model, str(where)], env=env, check=True, capture_output=True)
    return where


def machine() -> str:
    import torch

    return (f"{platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(1 thread per process), {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, python {platform.python_version()}, torch {torch.__version__}")


def mb(x) -> str:
    return "-" if x is None else f"{x / MB:.0f}"


def table(rows: dict[str, dict], before: dict[str, dict]) -> str:
    head = "| row | client peak RSS MB | RSS before the model MB | peak - before MB | RSS at the end MB | " \
           "time model estimate MB |" + (" peak RSS before this change MB |" if before else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, r in rows.items():
        base = r.get("rss_before_model_bytes")
        cells = [ROWS[row][0], mb(r["peak_rss_bytes"]), mb(base),
                 mb(None if base is None else r["peak_rss_bytes"] - base), mb(r.get("rss_bytes")),
                 mb(r["estimate_bytes"])]
        if before:
            cells.append(mb(before[row]["peak_rss_bytes"]) if row in before else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoints", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    ap.add_argument("--samples", type=int, default=24, help="training samples (all on the one client)")
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cut", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per process")
    ap.add_argument("--before", type=Path, help="also run every row with the code in this src directory")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.md")
    args = ap.parse_args()
    if not (E2E / "trainset.csv").is_file():
        print(f"skipped: E2E data not found at {E2E}")
        return
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="splitcom-memory-bf16-") as tmp:
        for ckpt in args.checkpoints:
            model = args.model if ckpt == "fp32" else str(bf16_copy(args.model, Path(tmp) / "model"))
            rows, before = {}, {}
            for row in args.rows:
                rows[row] = r = run_row(args, row, ROOT / "src", model)
                print(f"{ckpt} {row}: peak RSS {mb(r['peak_rss_bytes'])} MB, before the model "
                      f"{mb(r.get('rss_before_model_bytes'))} MB, at the end {mb(r.get('rss_bytes'))} MB, estimate "
                      f"{mb(r['estimate_bytes'])} MB ({r['client_wall_s']:.0f} s)", flush=True)
                if args.before is not None:
                    before[row] = run_row(args, row, args.before, model)
                    print(f"{ckpt} {row} before: peak RSS {mb(before[row]['peak_rss_bytes'])} MB", flush=True)
            results[ckpt] = {"rows": rows, "before": before}
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py " + " ".join(sys.argv[1:])
    text = (f"# Memory of one deployed client\n\n`{cmd.strip()}`\n\n{machine()}\n\n"
            f"{args.model}, E2E, {args.samples} training samples on one client, 1 epoch, batch {args.batch_size}, "
            f"max_length {args.max_length}, cut {args.cut}; a `splitcom server` and one client process over gRPC "
            "loopback. MB = 10^6 bytes.\n\n"
            "Peak RSS: the client process's VmHWM; before the model: its RSS once the runtime (python, torch, "
            "transformers, gRPC) is imported, before data, tokenizer and model load; peak - before: what data, "
            "model, adapters, optimizer state, activations and caches add; at the end: its RSS when the run is "
            "over; time model estimate: `client_memory_estimate_bytes` of the server's summary (the fleet's "
            "estimate of the client's weights, LoRA + AdamW state and activations). A deployed SFL client holds "
            "the embedding and its blocks only (models/hold.py): a prefix of blocks is all it loads; U-shape "
            "loads the whole checkpoint and drops the middle blocks, so its peak still holds that load.\n")
    for ckpt, res in results.items():
        text += f"\n## {CHECKPOINTS[ckpt]}\n\n{table(res['rows'], res['before'])}\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
