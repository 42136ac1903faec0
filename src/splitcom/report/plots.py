"""PNG figures comparing runs, drawn from their ``metrics.jsonl`` events.

One builder per figure, each ``runs -> Figure or None`` (None: no run has the data), kept in
``FIGURES`` in page order; ``draw_all`` saves them. Each run has one colour in every figure; the
legend names runs by directory. Byte axes use decimal units (1 MB = 10^6 B, as the CLI prints)
and switch to a log scale when the values span more than ``LOG_SPAN``; zeros cannot sit on a log
axis and are left out there. Uses matplotlib's object API (no pyplot): no display, no global state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, MaxNLocator, PercentFormatter

from splitcom.report.runs import RunData

LOG_SPAN = 30.0  # max/min ratio above which an axis goes logarithmic
DPI = 130
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22"]
_DIRECTION = {"up": "client → server", "down": "server → client"}


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def run_style(i: int) -> dict:
    """Colour, marker and a width that shrinks with the run index, so identical curves stay visible
    (a later run draws inside an earlier one instead of hiding it)."""
    return {"color": color(i), "marker": _MARKERS[i % len(_MARKERS)], "lw": max(1.0, 2.8 - 0.6 * i),
            "ms": max(3.5, 8.0 - 1.5 * i), "zorder": 2 + i}


def _use_log(values: list[float]) -> bool:
    pos = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return len(pos) >= 2 and max(pos) / min(pos) > LOG_SPAN


def _scale(ax, axis: str, values: list[float]) -> bool:
    """Log scale where the values span decades; otherwise linear from zero for non-negative data."""
    log = _use_log(values)
    if log:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    elif values and min(values) >= 0 and axis == "x":
        ax.set_xlim(left=0)
    elif values and min(values) >= 0:
        ax.set_ylim(bottom=0)
    return log


def _style(ax) -> None:
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(fig: Figure, runs: list[tuple[int, RunData]], extra: list[tuple[str, dict]] = ()) -> None:
    """One figure-level legend below the panels: a line per (index, run) shown, in the run's style."""
    handles = [Line2D([], [], label=r.label, **run_style(i)) for i, r in runs]
    handles += [Line2D([], [], label=text, **style) for text, style in extra]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)


def stream_bytes_per_epoch(run: RunData) -> dict[str, list[tuple[int, int]]]:
    """{stream: [(epoch, bytes sent in that epoch)]} from the cumulative counters of ``eval`` events."""
    evals = run.evals
    out: dict[str, list[tuple[int, int]]] = {}
    for prev, cur in zip(evals, evals[1:], strict=False):
        before, after = prev.get("bytes_by_stream", {}), cur.get("bytes_by_stream", {})
        for stream in after:
            out.setdefault(stream, []).append((int(cur["epoch"]), after[stream] - before.get(stream, 0)))
    return out


def _moving_mean(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def loss_curves(runs: list[RunData]) -> Figure | None:
    """Train loss per step (thin: every logged client step; bold: its moving mean) and validation loss per
    epoch (epoch 0: before training), one colour per run."""
    steps = [[e["loss"] for e in r.of("step") if isinstance(e.get("loss"), int | float)] for r in runs]
    vals = [[(e["epoch"], e["val_loss"]) for e in r.evals if "val_loss" in e] for r in runs]
    if not any(steps) and not any(vals):
        return None
    fig = Figure(figsize=(11.0, 4.4), layout="constrained")
    ax_train, ax_val = fig.subplots(1, 2)
    for i, losses in enumerate(steps):
        if losses:
            style = run_style(i)
            ax_train.plot(range(1, len(losses) + 1), losses, color=style["color"], lw=0.6, alpha=0.3)
            ax_train.plot(range(1, len(losses) + 1), _moving_mean(losses, max(1, len(losses) // 40)),
                          color=style["color"], lw=style["lw"], zorder=style["zorder"])
    if not any(steps):
        ax_train.text(0.5, 0.5, "no step events logged", ha="center", va="center", transform=ax_train.transAxes,
                      color="gray")
    ax_train.set_xlabel("logged training step (one client's batch)")
    ax_train.set_ylabel("train loss (completion tokens)")
    ax_train.set_title("Train loss per step (bold: moving mean)", fontsize=10)
    for i, pts in enumerate(vals):
        if pts:
            ax_val.plot(*zip(*pts, strict=True), **run_style(i))
    ax_val.set_ylabel("validation loss")
    ax_val.set_title("Validation loss per epoch (0: before training)", fontsize=10)
    _epoch_axis(ax_val)
    for ax in (ax_train, ax_val):
        _style(ax)
    _legend(fig, list(enumerate(runs)))
    return fig


def bytes_per_stream(runs: list[RunData]) -> Figure | None:
    per_run = [stream_bytes_per_epoch(r) for r in runs]
    totals: dict[str, int] = {}
    for d in per_run:
        for stream, pts in d.items():
            totals[stream] = totals.get(stream, 0) + sum(b for _, b in pts)
    streams = [s for s, t in sorted(totals.items(), key=lambda kv: -kv[1]) if t > 0]
    if not streams:
        return None
    ncols = min(3, len(streams))
    nrows = math.ceil(len(streams) / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.1 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, stream in zip(axes, streams, strict=False):
        values = [b for d in per_run for _, b in d.get(stream, [])]
        log = _use_log(values)
        for i, d in enumerate(per_run):
            pts = [(e, b) for e, b in d.get(stream, []) if b > 0 or not log]
            if pts:
                ax.plot(*zip(*pts, strict=True), **run_style(i))
        _scale(ax, "y", values)
        direction = _DIRECTION.get(stream.rsplit("_", 1)[-1], "both ways")
        ax.set_title(f"{stream}  ({direction})", fontsize=10)
        ax.yaxis.set_major_formatter(EngFormatter(unit="B"))
        _epoch_axis(ax)
        _style(ax)
    for ax in axes[len(streams):]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("bytes sent in the epoch")
    _legend(fig, list(enumerate(runs)))
    fig.suptitle("Bytes per stream per epoch (all clients)", fontsize=12)
    return fig


def bytes_vs_ppl(runs: list[RunData]) -> Figure | None:
    series = []
    for r in runs:
        pts = [(e["bytes_up"] + e["bytes_down"], e["val_ppl"], e["epoch"]) for e in r.evals
               if "val_ppl" in e and "bytes_up" in e]  # from the untrained point (epoch 0) on
        initial = next((e["val_ppl"] for e in r.evals if e.get("epoch") == 0 and "val_ppl" in e), None)
        series.append((pts, initial))
    if not any(e > 0 for pts, _ in series for _, _, e in pts):
        return None
    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.subplots()
    xs = [x for pts, _ in series for x, _, _ in pts]
    ys = [y for pts, _ in series for _, y, _ in pts]
    for i, (pts, _) in enumerate(series):
        if pts:
            x, y, epochs = zip(*pts, strict=True)
            ax.plot(x, y, **run_style(i))
            if len(pts) <= 12:
                for xe, ye, ep in pts:
                    ax.annotate(f"{ep}", (xe, ye), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                color=color(i))
    if _scale(ax, "x", xs):  # a zero (nothing sent before training) cannot sit on a log axis
        for line in ax.lines:
            x, y = line.get_data()
            keep = [j for j, v in enumerate(x) if v > 0]
            line.set_data([x[j] for j in keep], [y[j] for j in keep])
    log_y = _use_log(ys)
    if log_y:
        ax.set_yscale("log")
    # The untrained perplexity is usually far above the rest: a legend entry keeps it off the axis range.
    initial = {r.label: init for r, (_, init) in zip(runs, series, strict=True) if init}
    values = set(initial.values())
    if len(values) == 1:
        notes = [f"before training: {values.pop():.2f}"]
    else:
        notes = [f"{k} before training: {v:.2f}" for k, v in initial.items()]
    ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    ax.set_xlabel("cumulative bytes sent, up + down")
    ax.set_ylabel("validation perplexity" + (" (log)" if log_y else ""))
    ax.set_title("Validation perplexity against bytes sent (numbers: epoch)", fontsize=11)
    _style(ax)
    _legend(fig, list(enumerate(runs)), [(n, {"ls": "none"}) for n in notes])
    return fig


def reuse(runs: list[RunData]) -> Figure | None:
    """Only runs with temporal reuse on (a run without it logs reuse 0 every epoch: nothing to see)."""
    with_events = [(i, r) for i, r in enumerate(runs) if r.of("reuse") and r.reuse_enabled]
    if not with_events:
        return None
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    ax_ratio, ax_thr = fig.subplots(1, 2)
    thresholds = []
    for i, r in with_events:
        ev = sorted(r.of("reuse"), key=lambda e: e["epoch"])
        epochs = [e["epoch"] for e in ev]
        ax_ratio.plot(epochs, [e.get("reuse_ratio", 0.0) for e in ev], **run_style(i))
        if r.reuse_enabled:
            gap = [(e["epoch"], 1.0 - e["threshold"]) for e in ev if e.get("threshold") is not None]
            thresholds += [g for _, g in gap]
            if gap:
                ax_thr.plot(*zip(*gap, strict=True), **run_style(i))
    ax_ratio.set_ylim(-0.03, 1.03)
    ax_ratio.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax_ratio.set_ylabel("samples whose activation was reused")
    ax_ratio.set_title("Reuse ratio per epoch", fontsize=10)
    if thresholds and all(g > 0 for g in thresholds):
        ax_thr.set_yscale("log")
        ax_thr.set_ylabel("1 − threshold  (log; lower = stricter)")
    else:
        ax_thr.set_ylabel("1 − threshold")
    ax_thr.set_title("Reuse threshold per epoch  (REUSE when cos ≥ threshold)", fontsize=10)
    if not thresholds:
        ax_thr.text(0.5, 0.5, "temporal reuse off in every run", ha="center", va="center",
                    transform=ax_thr.transAxes, color="gray")
    for ax in (ax_ratio, ax_thr):
        _epoch_axis(ax)
        _style(ax)
    _legend(fig, with_events)
    return fig


def sim_time(runs: list[RunData]) -> Figure | None:
    series = [(i, r.sim_times()) for i, r in enumerate(runs)]
    series = [(i, pts) for i, pts in series if pts]
    if not series:
        return None
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    values = []
    for i, pts in series:
        ax.plot(*zip(*pts, strict=True), **run_style(i))
        values += [t for _, t in pts]
    log = _use_log(values)
    if log:
        ax.set_yscale("log")
    ax.yaxis.set_major_formatter(EngFormatter(unit="s"))
    ax.set_ylabel("simulated time since the start, running total" + (" (log)" if log else ""))
    ax.set_title("Simulated deployment time (device and link model), running total at each epoch's end",
                 fontsize=10)
    _epoch_axis(ax)
    _style(ax)
    _legend(fig, [(i, runs[i]) for i, _ in series])
    return fig


# name -> (caption, figure builder), in page order.
FIGURES: dict[str, tuple[str, Callable[[list[RunData]], Figure | None]]] = {
    "loss": ("Loss curves: train loss per step, validation loss per epoch", loss_curves),
    "bytes_per_stream": ("Bytes per stream per epoch", bytes_per_stream),
    "bytes_vs_ppl": ("Cumulative bytes against validation perplexity", bytes_vs_ppl),
    "reuse": ("Temporal reuse: reuse ratio and threshold per epoch", reuse),
    "sim_time": ("Simulated deployment time, running total per epoch", sim_time),
}


def draw_all(runs: list[RunData], out_dir: Path) -> dict[str, Path | None]:
    """Every figure as ``out_dir/<name>.png``; None for a figure no run has data for (a PNG left by
    an earlier report of other runs is removed, so the folder never shows a stale figure)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | None] = {}
    for name, (_, build) in FIGURES.items():
        path = out_dir / f"{name}.png"
        fig = build(runs)
        if fig is None:
            path.unlink(missing_ok=True)
            written[name] = None
        else:
            fig.savefig(path, dpi=DPI)
            written[name] = path
    return written
