"""User errors: exit code 2 and one line naming the key or file, never a traceback."""

import pytest
from typer.testing import CliRunner

from splitcom.cli import app

runner = CliRunner()
FAST = ["--set", "model.name=tiny-llama", "--set", "data.max_train_samples=12", "--set",
        "data.max_eval_samples=4", "--set", "train.epochs=1", "--no-progress"]


def _err(result):
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    return text


@pytest.mark.parametrize("args,needle", [
    (["--set", "bogus.key=1"], "bogus: unknown config key"),
    (["--set", "model.bogus=1"], "model.bogus: unknown config key"),
    (["--set", "train.epochs=two"], "train.epochs"),
    (["--set", "split.cut_layer=4"], "split.cut_layer"),
    (["--set", "split.cut_layer=0"], "split.cut_layer"),
    (["--set", "data.dataset=e2e:/nonexistent/e2e"], "/nonexistent/e2e/trainset.csv"),
    (["--set", "data.dataset=foo"], "data.dataset"),
    (["--set", "federation.num_clients=20"], "federation.num_clients"),
    (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
    (["--set", "model.lora.cut_rank=9"], "model.lora.cut_rank"),
    (["--set", "model.lora.cut_rank=2", "--set", "federation.server_adapters=shared"],
     "model.lora.cut_rank, federation.server_adapters"),
    (["--resume"], "checkpoint.pt"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    text = _err(runner.invoke(app, ["run", *FAST, *args, "--out", str(tmp_path)]))
    assert needle in text


def test_missing_column_names_file(tmp_path):
    d = tmp_path / "e2e"
    d.mkdir()
    (d / "trainset.csv").write_text("mr,text\na[b],c\n")
    (d / "devset.csv").write_text("mr,ref\na[b],c\n")
    text = _err(runner.invoke(app, ["run", *FAST, "--set", f"data.dataset=e2e:{d}", "--out", str(tmp_path)]))
    assert "trainset.csv" in text and "ref" in text


def test_run_prints_headline(tmp_path):
    result = runner.invoke(app, ["run", *FAST, "--set", "federation.num_clients=2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "val loss" in result.output and (tmp_path / "summary.json").is_file()


def test_out_is_never_overwritten_silently(tmp_path):
    """--out naming a file: exit 2, one line. A directory holding a finished run: exit 2 naming --resume and
    --force; --force starts afresh; the end of a run points at eval and report."""
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _err(runner.invoke(app, ["run", *FAST, "--out", str(f)]))
    out = tmp_path / "run"
    first = runner.invoke(app, ["run", *FAST, "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert f"splitcom eval {out}" in first.output and f"splitcom report {out}" in first.output
    before = (out / "summary.json").read_bytes()
    text = _err(runner.invoke(app, ["run", *FAST, "--out", str(out)]))
    assert "finished run" in text and "--resume" in text and "--force" in text
    assert (out / "summary.json").read_bytes() == before  # nothing was touched
    (out / "summary.json").unlink()
    assert "interrupted run" in _err(runner.invoke(app, ["run", *FAST, "--out", str(out)]))
    again = runner.invoke(app, ["run", *FAST, "--set", "train.seed=1", "--out", str(out), "--force"])
    assert again.exit_code == 0, again.output


def test_score_cli(tmp_path):
    refs, hyps = tmp_path / "refs.txt", tmp_path / "hyps.txt"
    refs.write_text("The Eagle is a pub.\nThe Eagle pub.\n\nZizzi serves French food.\n")
    hyps.write_text("The Eagle is a pub.\nZizzi serves French food.\n")
    result = runner.invoke(app, ["score", "--refs", str(refs), "--hyps", str(hyps), "--json"])
    assert result.exit_code == 0, result.output
    assert '"BLEU": 1.0' in result.output
    hyps.write_text("only one line\n")
    text = _err(runner.invoke(app, ["score", "--refs", str(refs), "--hyps", str(hyps)]))
    assert "hyps.txt" in text and "refs.txt" in text
