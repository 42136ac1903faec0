"""``splitcom eval``, ``report`` and ``export``: what to do with a finished run directory.

Plain functions, registered on the app in ``cli.py``. User errors print one line and exit 2, as
every other command does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from splitcom.errors import UserError

console = Console(stderr=True)


def _fail(err: UserError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    raise typer.Exit(err.exit_code)


def _quiet() -> None:
    """transformers/peft deprecation notices and weight-loading bars are not the user's business here."""
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    hf_logging.disable_progress_bar()


def eval_cmd(
    out: Annotated[Path, typer.Argument(help="Run directory (config.yaml, adapter/).")],
    split: Annotated[str, typer.Option("--split", help="`dev` (validation examples) or `train`.")] = "dev",
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="Cap on distinct inputs.")] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="Evaluate on another dataset spec (e.g. dart:DIR); default: the run's.")] = None,
    beams: Annotated[int, typer.Option("--beams", help="Beam width.")] = 10,
    length_penalty: Annotated[float, typer.Option("--length-penalty", help="Beam length penalty.")] = 0.8,
    no_repeat_ngram: Annotated[int, typer.Option("--no-repeat-ngram", help="n-gram size (0: off).")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most new tokens per input.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Inputs per generate call.")] = 8,
    threads: Annotated[int, typer.Option(
        "--threads", help="Torch threads while decoding (0: as many as there are idle cores).")] = 0,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, auto (default: run's).")] = None,
    java: Annotated[bool, typer.Option(help="Use Java for METEOR and the PTB tokeniser.")] = True,
) -> None:
    """Generate with the merged adapter (beam search) and score with the E2E metrics: OUT/eval/."""
    _quiet()
    try:
        from splitcom.evaluate.generate import GenerationSettings, evaluate_run
        from splitcom.evaluate.score import format_scores

        settings = GenerationSettings(num_beams=beams, length_penalty=length_penalty,
                                      no_repeat_ngram_size=no_repeat_ngram, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, threads=threads)
        scores = evaluate_run(out, split=split, max_samples=max_samples, settings=settings, dataset=dataset,
                              device=device, use_java=java)
    except UserError as err:
        _fail(err)
    typer.echo(format_scores(scores))
    console.print(f"{scores['n_inputs']} inputs ({scores['n_references']} references) of {scores['dataset']} "
                  f"{scores['split']} in {scores['wall_s']:.1f} s (decode {scores['gen_seconds']:.1f} s, "
                  f"{scores['gen_tokens']} tokens, {scores['tokens_per_s']:.1f} tokens/s, beam {beams}, "
                  f"threads {scores['gen_threads']}) -> {out / 'eval'}/ (predictions.txt, "
                  "references.txt, inputs.txt, scores.json)", highlight=False)


def report_cmd(
    outs: Annotated[list[Path], typer.Argument(help="Run directories; the first is the baseline.")],
    html: Annotated[Path | None, typer.Option("--html", help="Write the HTML page here instead.")] = None,
) -> None:
    """PNG plots, Markdown and HTML comparing runs side by side (written to FIRST_OUT/report/)."""
    _quiet()
    try:
        from splitcom.report.build import write_report

        written = write_report(outs, html)
    except UserError as err:
        _fail(err)
    figures = [k for k in written if k not in ("dir", "markdown", "html")]
    console.print(f"report -> {written['dir']}/ ({', '.join(f + '.png' for f in figures)}, report.md); "
                  f"html: {written['html']}", highlight=False)


def export_cmd(
    out: Annotated[Path, typer.Argument(help="Run directory.")],
    dest: Annotated[Path, typer.Argument(help="Destination directory (a PEFT adapter directory).")],
    merged: Annotated[bool, typer.Option("--merged", help="Also write DEST/merged/ (merged model).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty DEST.")] = False,
) -> None:
    """The aggregated adapter as a PEFT directory (PeftModel.from_pretrained), optionally merged."""
    _quiet()
    try:
        from splitcom.report.export import export_run

        written = export_run(out, dest, merged=merged, force=force)
    except UserError as err:
        _fail(err)
    console.print(f"exported -> {dest}/ ({', '.join(p.name for p in written)}, tokenizer)", highlight=False)
