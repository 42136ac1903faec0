"""``splitcom report OUT [OUT2 ...] [--html FILE]``: figures and tables comparing runs.

Writes ``OUT/report/`` of the first run named: one PNG per figure (see ``plots.FIGURES``),
``report.md`` (figures linked relatively) and ``report.html`` (figures embedded, so ``--html``
may put it anywhere).
"""

from __future__ import annotations

from pathlib import Path

from splitcom.report import html, markdown, plots, tables
from splitcom.report.runs import load_runs

ABSENT = {  # why a figure can be missing
    "loss": "No run logged a loss.",
    "bytes_per_stream": "No run has bytes counted after an epoch.",
    "bytes_vs_ppl": "No run has a validation after an epoch.",
    "reuse": "No run has temporal reuse on (centralized runs have none).",
    "sim_time": "No run has a simulated time (centralized runs have none).",
}


def write_report(outs: list[str | Path], html_path: str | Path | None = None) -> dict[str, Path]:
    """Draw and write everything; returns {"dir", "markdown", "html", <figure name>: png}."""
    runs = load_runs(list(outs))
    report_dir = runs[0].path / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    pngs = plots.draw_all(runs, report_dir)
    headline, diff = tables.headline(runs), tables.config_diff(runs)
    captions = [(plots.FIGURES[name][0], png, ABSENT[name]) for name, png in pngs.items()]

    md_path = report_dir / "report.md"
    md_figs = [(c, None if p is None else p.relative_to(report_dir), note) for c, p, note in captions]
    md_path.write_text(markdown.render(runs, headline, diff, md_figs), encoding="utf-8")
    out_html = Path(html_path) if html_path else report_dir / "report.html"
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(html.render(runs, headline, diff, captions), encoding="utf-8")
    return {"dir": report_dir, "markdown": md_path, "html": out_html,
            **{name: p for name, p in pngs.items() if p is not None}}
