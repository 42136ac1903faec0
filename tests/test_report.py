"""``splitcom report``: figures, Markdown and HTML from run directories (hand-made runs, and one real)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import tiny_cfg
from matplotlib.image import imread
from typer.testing import CliRunner

from splitcom.cli import app
from splitcom.config import dump_config
from splitcom.errors import UserError
from splitcom.federation.simulation import run
from splitcom.report import plots, tables
from splitcom.report.build import write_report
from splitcom.report.runs import labels_for, load_run, load_runs

runner = CliRunner()
MB = 1_000_000


def make_run(path, *, act_per_epoch, epochs=3, reuse=None, sim=None, summary=True, **cfg_over):
    """A run directory as `splitcom run` writes it, with chosen numbers.

    ``reuse``: per-epoch (threshold, ratio) or None; ``sim``: simulated seconds per epoch or None.
    """
    path.mkdir(parents=True)
    cfg = tiny_cfg(**cfg_over)
    (path / "config.yaml").write_text(dump_config(cfg))
    streams = {"control": 400}
    events, ppl = [], 600.0
    for epoch in range(epochs + 1):
        if epoch:
            streams = dict(streams, act_up=streams.get("act_up", 0) + act_per_epoch,
                           grad_down=streams.get("grad_down", 0) + act_per_epoch,
                           control=streams["control"] + 100, labels_up=20_000)
            ppl *= 0.8
        up = streams.get("act_up", 0) + streams.get("labels_up", 0) + 200
        down = sum(streams.values()) - up
        ev = {"event": "eval", "epoch": epoch, "val_loss": math.log(ppl),
              "val_ppl": ppl, "bytes_up": up, "bytes_down": down, "bytes_by_stream": dict(streams),
              "wall_s": epoch}
        if sim is not None:
            ev["simulated_s"] = epoch * sim
        events.append(ev)
        if epoch and reuse is not None:
            thr, ratio = reuse[epoch - 1]
            events.append({"event": "reuse", "epoch": epoch, "threshold": thr, "reuse_ratio": ratio})
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary:
        last = events[-1] if events[-1]["event"] == "eval" else events[-2]
        (path / "summary.json").write_text(json.dumps({
            "model": "tiny-llama", "mode": "sfl", "num_clients": 3, "epochs": epochs, "cut_layer": 2,
            "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"], "bytes_by_stream": streams,
            "initial_val_loss": events[0]["val_loss"], "val_loss": last["val_loss"],
            "val_ppl": last["val_ppl"],
            "wall_s": 12.5, "peak_rss_bytes": 500 * MB,
            **({"reuse_ratio": sum(r for _, r in reuse) / len(reuse)} if reuse else {})}))
    return path


@pytest.fixture
def two_runs(tmp_path):
    base = make_run(tmp_path / "fp32", act_per_epoch=2 * MB)
    reuse = make_run(tmp_path / "reuse", act_per_epoch=10_000,
                     reuse=[(0.99, 0.0), (0.999, 0.5), (0.9999, 0.9)],
                     sim=120.0, **{"compression.temporal.enabled": True, "compression.codec": "int8"})
    return base, reuse


def test_bytes_per_epoch_are_differences_of_the_cumulative_counters(two_runs):
    per_epoch = plots.stream_bytes_per_epoch(load_run(two_runs[0]))
    assert per_epoch["act_up"] == [(1, 2 * MB), (2, 2 * MB), (3, 2 * MB)]
    assert per_epoch["labels_up"] == [(1, 20_000), (2, 0), (3, 0)]
    assert per_epoch["control"] == [(1, 100), (2, 100), (3, 100)]


def test_figures_use_log_axes_where_values_span_decades(two_runs):
    runs = load_runs(list(two_runs))
    fig = plots.bytes_per_stream(runs)
    by_title = {ax.get_title().split()[0]: ax for ax in fig.axes if ax.get_visible()}
    assert by_title["act_up"].get_yscale() == "log"  # 2 MB against 10 kB per epoch
    assert by_title["control"].get_yscale() == "linear"  # the same in both runs
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fp32", "reuse"]
    thr_ax = plots.reuse(runs).axes[1]
    assert thr_ax.get_yscale() == "log"  # 1 - threshold from 1e-2 to 1e-4
    assert len(thr_ax.lines) == 1  # only the run with reuse on has a threshold
    fig = plots.bytes_vs_ppl(runs)
    assert fig.axes[0].get_xscale() == "log"  # 12 MB against 20 kB cumulative


def test_report_writes_pngs_markdown_and_html(two_runs, tmp_path):
    html_path = tmp_path / "elsewhere" / "page.html"
    result = runner.invoke(app, ["report", str(two_runs[0]), str(two_runs[1]), "--html", str(html_path)])
    assert result.exit_code == 0, result.output
    report = two_runs[0] / "report"
    for name in plots.FIGURES:
        image = imread(report / f"{name}.png")
        assert image.shape[0] > 300 and image.shape[1] > 600, name
        assert image[..., :3].std() > 0.05, name  # not a blank canvas
    md = (report / "report.md").read_text()
    assert "| bytes total | 12.02 MB | 80.70 kB (×0.01) |" in md
    assert "| activations up (act_up) | 6.00 MB | 30.00 kB (×0.01) |" in md
    assert "| compression.codec | fp32 | int8 |" in md
    assert "| simulated time | — | 360 s |" in md
    assert "![Bytes per stream per epoch](bytes_per_stream.png)" in md
    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == len(plots.FIGURES)
    assert "<td>reuse ratio</td><td>—</td><td>46.7%</td>" in page
    assert not (report / "report.html").exists()


def test_missing_data_gives_a_note_not_a_figure(tmp_path):
    run_dir = make_run(tmp_path / "plain", act_per_epoch=MB, summary=False)
    (run_dir / "report").mkdir()
    (run_dir / "report" / "sim_time.png").write_bytes(b"stale")
    written = write_report([run_dir])
    assert set(written) == {"dir", "markdown", "html", "loss", "bytes_per_stream", "bytes_vs_ppl"}
    assert not (run_dir / "report" / "sim_time.png").exists()
    md = written["markdown"].read_text()
    assert "_No run has temporal reuse on" in md and "_No run has a simulated time" in md
    # Without summary.json the table falls back on the last eval event.
    assert "| bytes total | 6.02 MB |" in md and "| peak RSS | — |" in md


def test_loss_curves_come_first_and_bytes_vs_ppl_starts_untrained(two_runs, tmp_path):
    """The first figure is the loss curves (train loss per step, val loss per epoch, a line per run); the
    bytes-vs-ppl curve starts at the untrained point; runs without reuse are not drawn in the reuse figure."""
    assert next(iter(plots.FIGURES)) == "loss"
    base = two_runs[0]
    with (base / "metrics.jsonl").open("a") as fh:
        for k in range(30):
            fh.write(json.dumps({"event": "step", "epoch": 1, "step": k, "client": k % 3, "loss": 3.0 - k / 20}) + "\n")
    runs = load_runs(list(two_runs))
    fig = plots.loss_curves(runs)
    train, val = fig.axes
    assert len(train.lines) == 2  # the base run's raw losses and their moving mean; the other logged none
    assert len(val.lines) == 2 and list(val.lines[0].get_xdata()) == [0, 1, 2, 3]
    lin = load_runs([make_run(tmp_path / "lin", act_per_epoch=10_000, sim=1.0)])
    assert plots.bytes_vs_ppl(lin).axes[0].lines[0].get_xdata()[0] == lin[0].evals[0]["bytes_up"] + \
        lin[0].evals[0]["bytes_down"]  # the epoch-0 point, before any training traffic
    plain = make_run(tmp_path / "plain", act_per_epoch=MB, reuse=[(0.99, 0.0)] * 3)  # reuse events, reuse off
    assert plots.reuse(load_runs([plain])) is None
    assert "running total" in plots.sim_time(lin).axes[0].get_title()


def test_labels_and_run_errors(tmp_path):
    a = make_run(tmp_path / "a" / "run", act_per_epoch=MB)
    b = make_run(tmp_path / "b" / "run", act_per_epoch=MB)
    assert labels_for([a, b]) == ["a/run", "b/run"]
    assert [r.label for r in load_runs([a, b])] == ["a/run", "b/run"]
    with pytest.raises(UserError, match="named twice"):
        load_runs([a, a])
    with pytest.raises(UserError, match="run directory not found"):
        load_runs([tmp_path / "nope"])
    with pytest.raises(UserError, match="no metrics.jsonl"):
        load_runs([tmp_path / "a"])
    lines = (a / "metrics.jsonl").read_text().splitlines()
    (a / "metrics.jsonl").write_text("\n".join(lines) + '\n{"event": "ev')  # a run still writing
    assert len(load_run(a).events) == len(lines)
    (a / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]))
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON line"):
        load_run(a)
    result = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "run directory not found" in result.output


def test_config_diff_lists_only_differing_keys(two_runs):
    rows = dict(tables.config_diff(load_runs(list(two_runs))))
    assert rows == {"compression.codec": ["fp32", "int8"], "compression.temporal.enabled": ["False", "True"]}


def test_report_on_a_real_run(tmp_path):
    """The event schema `splitcom run` writes today is the one the report reads."""
    out = tmp_path / "real"
    cfg = tiny_cfg(**{"train.epochs": 1, "data.max_train_samples": 12, "data.max_eval_samples": 4,
                      "compression.temporal.enabled": True})
    summary = run(cfg, out, progress=False)
    written = write_report([out])
    assert {"bytes_per_stream", "bytes_vs_ppl", "reuse", "sim_time"} <= set(written)
    runs = load_runs([out])
    per_epoch = plots.stream_bytes_per_epoch(runs[0])
    assert per_epoch["act_up"] == [(1, summary["bytes_by_stream"]["act_up"])]
    md = written["markdown"].read_text()
    assert f"| val perplexity | {summary['val_ppl']:.2f} |" in md
    assert f"| simulated time | {tables.fmt_seconds(summary['simulated_s'])} |" in md
    assert tables.fmt_seconds(0.09121) == "91.2 ms" and tables.fmt_seconds(360.0) == "360 s"


def test_codec_column_reads_codec_maps_by_stream():
    from pathlib import Path

    from splitcom.report.runs import RunData, flatten

    maps = flatten({"compression": {"codec": {"act_up": "int8", "act_down": "int8o"}, "grad_codec": "int4"}})
    one = {"compression.codec": "fp32", "compression.grad_codec": "fp32"}
    assert tables._codecs(RunData(Path("a"), "a", [], config=maps)) == "act_up int8, act_down int8o / int4"
    assert tables._codecs(RunData(Path("b"), "b", [], config=one)) == "fp32 / fp32"
