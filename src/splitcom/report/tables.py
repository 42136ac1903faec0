"""The side-by-side tables of a report, as plain rows of strings (Markdown and HTML render them).

``headline`` takes each run's ``summary.json`` (falling back to its last ``eval`` event when the run
has no summary) and ``eval/scores.json``; ratios are relative to the first run named, the baseline.
``config_diff`` lists the config keys whose values differ between runs: what the comparison is about.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from splitcom.evaluate.metrics import METRIC_NAMES
from splitcom.report.runs import RunData

DASH = "—"
Row = tuple[str, list[str]]


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return DASH
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ratio(x: float | None, base: float | None) -> str:
    if x is None or not base:
        return ""
    return f" (×{x / base:.2f})"


def _last_eval(run: RunData) -> dict:
    evals = run.evals
    return evals[-1] if evals else {}


def _get(run: RunData, key: str):
    """A summary figure, or the same figure from the last eval event."""
    if key in run.summary:
        return run.summary[key]
    return _last_eval(run).get(key)


def _total_bytes(run: RunData) -> int | None:
    up, down = _get(run, "bytes_up"), _get(run, "bytes_down")
    return None if up is None or down is None else up + down


def _stream(run: RunData, stream: str) -> int | None:
    by = _get(run, "bytes_by_stream") or {}
    return by.get(stream)


def _val_loss(run: RunData) -> str:
    final = _get(run, "val_loss")
    initial = run.summary.get("initial_val_loss")
    if initial is None:
        initial = next((e.get("val_loss") for e in run.evals if e.get("epoch") == 0), None)
    if final is None:
        return DASH
    return f"{initial:.4f} → {final:.4f}" if initial is not None else f"{final:.4f}"


def fmt_seconds(x: float | None) -> str:
    if x is None:
        return DASH
    return f"{x * 1e3:.3g} ms" if 0 < abs(x) < 1 else f"{x:.4g} s"


def _sim_time(r: RunData) -> float | None:
    if isinstance(r.summary.get("simulated_s"), int | float):
        return float(r.summary["simulated_s"])
    times = r.sim_times()
    return times[-1][1] if times else None


def _codecs(r: RunData) -> str | None:
    def one(key: str) -> str | None:  # a codec, or a map by stream (flattened to key.stream entries)
        if key in r.config:
            return str(r.config[key])
        by_stream = {k[len(key) + 1:]: v for k, v in r.config.items() if k.startswith(key + ".")}
        return ", ".join(f"{k} {v}" for k, v in by_stream.items()) or None

    act = one("compression.codec")
    return None if act is None else f"{act} / {one('compression.grad_codec')}"


def _with_ratio(get: Callable[[RunData], float | None], fmt: Callable[[float | None], str]):
    def cells(runs: list[RunData]) -> list[str]:
        base = get(runs[0])
        return [fmt(get(r)) + (_ratio(get(r), base) if i and get(r) is not None else "")
                for i, r in enumerate(runs)]

    return cells


def _plain(get: Callable[[RunData], object]):
    return lambda runs: [DASH if get(r) is None else str(get(r)) for r in runs]


def headline(runs: list[RunData]) -> list[Row]:
    """Headline figures, one row each, one cell per run (ratios against the first run)."""
    rows: list[tuple[str, Callable[[list[RunData]], list[str]]]] = [
        ("model", _plain(lambda r: _get(r, "model") or r.config.get("model.name"))),
        ("mode", _plain(lambda r: _get(r, "mode") or r.config.get("federation.mode"))),
        ("clients", _plain(lambda r: _get(r, "num_clients"))),
        ("epochs", _plain(lambda r: _get(r, "epochs") or (_last_eval(r).get("epoch") or None))),
        ("cut layer", _plain(lambda r: _get(r, "cut_layer"))),
        ("codec (act / grad)", _plain(_codecs)),
        ("temporal reuse", _plain(lambda r: "on" if r.reuse_enabled else "off")),
        ("val loss (initial → final)", lambda rs: [_val_loss(r) for r in rs]),
        ("val perplexity", _with_ratio(lambda r: _get(r, "val_ppl"), lambda x: fmt_num(x, 2))),
        ("bytes up", _with_ratio(lambda r: _get(r, "bytes_up"), fmt_bytes)),
        ("bytes down", _with_ratio(lambda r: _get(r, "bytes_down"), fmt_bytes)),
        ("bytes total", _with_ratio(_total_bytes, fmt_bytes)),
        ("activations up (act_up)", _with_ratio(lambda r: _stream(r, "act_up"), fmt_bytes)),
        ("gradients down (grad_down)", _with_ratio(lambda r: _stream(r, "grad_down"), fmt_bytes)),
        ("reuse ratio", _plain(lambda r: None if r.summary.get("reuse_ratio") is None
                               else f"{r.summary['reuse_ratio']:.1%}")),
        ("wall time", _with_ratio(lambda r: r.summary.get("wall_s") or _last_eval(r).get("wall_s"),
                                  lambda x: DASH if x is None else f"{x:.1f} s")),
        ("peak RSS", _plain(lambda r: None if "peak_rss_bytes" not in r.summary
                            else fmt_bytes(r.summary["peak_rss_bytes"]))),
    ]
    if any(r.sim_times() for r in runs):
        rows.append(("simulated time", _with_ratio(_sim_time, fmt_seconds)))
    if any(r.scores for r in runs):
        rows.append(("eval inputs (split)", _plain(lambda r: None if not r.scores else
                                                   f"{r.scores.get('n_inputs')} ({r.scores.get('split')})")))
        for name in METRIC_NAMES:
            rows.append((name, _plain(lambda r, n=name: None if r.scores.get(n) is None
                                      else f"{r.scores[n]:.4f}")))
    if any(r.audit for r in runs):
        rows += audit_rows(runs)
    return [(label, cells(runs)) for label, cells in rows]


def _audit_cell(r: RunData, stream: str, part: str) -> str | None:
    """``learned / optimisation`` ROUGE-L (token accuracy) of one part, as `splitcom audit` measured it."""
    attacks = r.audit.get("streams", {}).get(stream)
    if not attacks:
        return None
    cells = [f"{a} {v['rouge_l']:.3f} ({v['token_acc']:.0%})" for a, res in attacks.items()
             if (v := res.get(part, {})).get("rouge_l") is not None and v.get("token_acc") is not None]
    return " / ".join(cells) or None


def audit_rows(runs: list[RunData]) -> list[tuple[str, Callable[[list[RunData]], list[str]]]]:
    rows: list[tuple[str, Callable[[list[RunData]], list[str]]]] = [
        ("audit: noise, dev samples", _plain(lambda r: None if not r.audit else
                                             f"{r.audit.get('noise', 0):g}, {r.audit.get('dev_samples')}"))]
    for stream in [s for s in ("act_up", "act_down") if any(s in r.audit.get("streams", {}) for r in runs)]:
        for part in ("prompt", "completion"):
            rows.append((f"audit {stream} {part}: ROUGE-L (token acc)",
                         _plain(lambda r, s=stream, p=part: _audit_cell(r, s, p))))
    return rows


def config_diff(runs: list[RunData]) -> list[Row]:
    """Config keys whose values differ between the runs (empty for one run)."""
    if len(runs) < 2:
        return []
    keys = sorted({k for r in runs for k in r.config})
    rows = []
    for key in keys:
        values = [r.config.get(key, DASH) for r in runs]
        if len({repr(v) for v in values}) > 1:
            rows.append((key, [str(v) for v in values]))
    return rows
