"""``report.md``: the tables and the figures (linked relatively) of a report, for a README or a PR."""

from __future__ import annotations

from pathlib import Path

from splitcom.report.runs import RunData
from splitcom.report.tables import Row


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[Row]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in [label, *cells]) + " |" for label, cells in rows]
    return "\n".join(lines)


def render(runs: list[RunData], headline: list[Row], diff: list[Row],
           figures: list[tuple[str, Path | None, str]]) -> str:
    """``figures``: (caption, PNG path relative to the Markdown file or None, note when absent)."""
    labels = [r.label for r in runs]
    parts = ["# SplitCom report", ""]
    parts += [f"- **{r.label}**: `{r.path}`" for r in runs]
    parts += ["", "Ratios in brackets are against the first run.", "", "## Headline figures", "",
              table(["", *labels], headline), ""]
    if diff:
        parts += ["## Config differences", "", table(["key", *labels], diff), ""]
    parts += ["## Figures", ""]
    for caption, path, note in figures:
        parts += [f"### {caption}", ""]
        parts += [f"![{caption}]({path.as_posix()})" if path is not None else f"_{note}_", ""]
    return "\n".join(parts)
