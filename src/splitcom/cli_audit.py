"""``splitcom audit RUN``: what an honest-but-curious server could read of a run's client text.

A plain function, registered on the app in ``cli.py``. User errors print one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splitcom.cli_eval import _fail, _quiet, console
from splitcom.errors import UserError


def audit_cmd(
    out: Annotated[Path, typer.Argument(help="Run directory (config.yaml, metrics.jsonl, adapter/).")],
    dev_samples: Annotated[int, typer.Option("--dev-samples", min=1, help="Dev samples the server sees.")] = 32,
    public: Annotated[str | None, typer.Option(
        "--public", help="Dataset spec of the server's public text (default: WebNLG for an E2E run and back, "
        "where it sits next to the run's data; else a held-out synthetic seed).")] = None,
    public_samples: Annotated[int, typer.Option("--public-samples", min=1, help="Public samples to train the "
                                                "inverter on.")] = 300,
    opt_samples: Annotated[int, typer.Option("--opt-samples", min=0, help="Dev samples for the optimisation "
                                             "attack (0: skip it; it is the slow one).")] = 8,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimisation attack steps.")] = 100,
    threads: Annotated[int, typer.Option("--threads", min=0, help="Torch threads (0: torch's default).")] = 0,
) -> None:
    """Attack the run's own act_up traffic (and act_down in U-shape) as the server: writes RUN/audit.json."""
    _quiet()
    try:
        import torch

        from splitcom.audit.run import AUDIT_FILE, audit_run

        if threads:
            torch.set_num_threads(threads)
        result = audit_run(out, dev_samples=dev_samples, public=public, public_n=public_samples,
                           opt_samples=opt_samples, steps=steps)
    except UserError as err:
        _fail(err)
    console.print(f"audit of {out} (cut {result['cut_layer']}, act_up codec {result['codec']}, reuse "
                  f"{'on' if result['reuse'] else 'off'}, noise {result['noise']:g}) on {result['dev_samples']} dev "
                  f"samples; public text {result['public']}", highlight=False)
    for stream, attacks in result["streams"].items():
        for attack, r in attacks.items():
            for part in ("prompt", "completion"):
                p = r[part]
                typer.echo(f"{stream:<8} {attack:<13} {part:<10} token acc {_pct(p['token_acc'])}  ROUGE-L "
                           f"{_num(p['rouge_l'])}  BLEU {_num(p['bleu'])}")
    console.print(f"-> {out / AUDIT_FILE} in {result['wall_s']:.1f} s", highlight=False)


def _pct(x: float | None) -> str:
    return "  -  " if x is None else f"{x:6.1%}"


def _num(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"
