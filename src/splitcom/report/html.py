"""``report.html``: one self-contained page (figures embedded as data URIs, so it can be moved or
mailed on its own) with the runs' tables side by side."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from splitcom.report.runs import RunData
from splitcom.report.tables import Row

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; } h3 { font-size: 1.05rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1rem 0 2rem; } figure img { max-width: 100%; border: 1px solid #eee; }
.note { color: #777; font-style: italic; } code { font-size: 0.85rem; }
"""


def table(header: list[str], rows: list[Row]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in [label, *cells]) + "</tr>\n"
                   for label, cells in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{escape(caption)}" src="data:image/png;base64,{data}">'


def render(runs: list[RunData], headline: list[Row], diff: list[Row],
           figures: list[tuple[str, Path | None, str]]) -> str:
    """``figures``: (caption, absolute PNG path or None, note shown when absent)."""
    labels = [r.label for r in runs]
    items = "".join(f"<li><b>{escape(r.label)}</b>: <code>{escape(str(r.path))}</code></li>" for r in runs)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>SplitCom report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>SplitCom report</h1>", f"<ul>{items}</ul>",
             '<p class="note">Ratios in brackets are against the first run.</p>',
             "<h2>Headline figures</h2>", table(["", *labels], headline)]
    if diff:
        parts += ["<h2>Config differences</h2>", table(["key", *labels], diff)]
    parts.append("<h2>Figures</h2>")
    for caption, path, note in figures:
        parts.append(f"<h3>{escape(caption)}</h3>")
        if path is not None:
            parts.append(f"<figure>{_img(path, caption)}</figure>")
        else:
            parts.append(f'<p class="note">{escape(note)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
