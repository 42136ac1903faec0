"""``splitcom`` command line. User errors print one line and exit 2; never a traceback."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from splitcom.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Split federated LoRA fine-tuning of LLMs.")
console = Console(stderr=True)


@app.callback()
def _group() -> None:
    """Split federated LoRA fine-tuning of LLMs: run, server, client, eval, score, report, export, audit."""


def _fail(err: UserError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    raise typer.Exit(err.exit_code)


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: dotted.key=value (repeatable).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("runs/latest"),
    progress: Annotated[bool, typer.Option(help="Live progress display.")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Go on from OUT/checkpoint.pt (written after every "
                                         "epoch) with OUT/config.yaml; `--set train.epochs=N` lengthens a run "
                                         "(finished or not) to N epochs.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start afresh in an OUT that holds a run (its files are "
                                        "overwritten).")] = False,
) -> None:
    """Simulate split federated fine-tuning (or the centralized baseline) on one machine."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from splitcom.config import load_config
        from splitcom.federation.simulation import run as run_sim
        from splitcom.runlog import CHECKPOINT, check_out_dir

        if not resume:
            check_out_dir(out, force)
        if resume and not (out / CHECKPOINT).is_file():  # before reading OUT/config.yaml
            raise UserError("no checkpoint to resume from (no epoch had finished)", where=str(out / CHECKPOINT))
        cfg = load_config(out / "config.yaml" if resume and config is None else config, set_ or [])
        if not progress:
            cfg.logging.progress = False
        summary = run_sim(cfg, out, progress=cfg.logging.progress and sys.stderr.isatty(), resume=resume)
    except UserError as err:
        _fail(err)
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    console.print(f"[bold]done[/] in {summary['wall_s']:.1f} s -> {out}/ (summary.json, metrics.jsonl, "
                  "config.yaml, adapter/)")
    console.print(f"model {summary['model']}, mode {summary['mode']}, clients {summary['num_clients']}, "
                  f"epochs {summary['epochs']}")
    console.print(f"val loss {summary['initial_val_loss']:.4f} -> {summary['val_loss']:.4f} "
                  f"(ppl {summary['val_ppl']:.2f}); sent up {mb(summary['bytes_up'])}, "
                  f"down {mb(summary['bytes_down'])}")
    for stream, n in summary["bytes_by_stream"].items():
        console.print(f"  {stream:<14} {mb(n)}")
    console.print(f"next: splitcom eval {out} (generation + E2E metrics), splitcom report {out} (plots, tables), "
                  f"splitcom export {out} DEST (a PEFT adapter)", highlight=False, soft_wrap=True)


@app.command()
def score(
    refs: Annotated[Path, typer.Option("--refs", help="References: one per line, a blank line between inputs.")],
    hyps: Annotated[Path, typer.Option("--hyps", help="Hypotheses: one per line.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the E2E script's format.")] = False,
) -> None:
    """BLEU, NIST, METEOR, ROUGE_L and CIDEr with the official E2E challenge definitions."""
    try:
        from splitcom.evaluate.score import score_command

        typer.echo(score_command(refs, hyps, as_json=as_json))
    except UserError as err:
        _fail(err)


from splitcom.cli_eval import eval_cmd, export_cmd, report_cmd  # noqa: E402

app.command("eval")(eval_cmd)
app.command("report")(report_cmd)
app.command("export")(export_cmd)


from splitcom.cli_audit import audit_cmd  # noqa: E402
from splitcom.deploy.cli import client_cmd, server_cmd  # noqa: E402

app.command("server")(server_cmd)
app.command("client")(client_cmd)
app.command("audit")(audit_cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
