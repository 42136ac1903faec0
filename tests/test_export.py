"""``splitcom export``: the exported adapter, reloaded with PEFT, gives the run's own validation loss."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_cfg
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from splitcom.cli import app
from splitcom.evaluate.perplexity import evaluate_loss
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import run
from splitcom.models.adapters import AdapterBank
from splitcom.models.load import load_model
from splitcom.models.split import SplitModel

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(**{"train.epochs": 1, "data.max_train_samples": 24, "data.max_eval_samples": 8})
    summary = run(cfg, out, progress=False)
    dest = tmp_path_factory.mktemp("export") / "adapter"
    result = runner.invoke(app, ["export", str(out), str(dest), "--merged"])
    assert result.exit_code == 0, result.output
    s = prepare(cfg)  # the same validation samples the run scored
    return cfg, out, summary, dest, s


def val_loss(model, setup) -> float:
    """The run's own validation function (token-weighted completion loss over the same samples)."""
    loss, _ = evaluate_loss(SplitModel(model), AdapterBank(model), setup.val, setup.cfg.train.eval_batch_size,
                            setup.pad_id)
    return loss


def test_export_layout_and_metadata(exported):
    cfg, out, _, dest, _ = exported
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                 "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json"):
        assert (dest / name).is_file(), name
    adapter_cfg = json.loads((dest / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "tiny-llama"
    assert adapter_cfg["r"] == cfg.model.lora.rank and adapter_cfg["peft_type"] == "LORA"
    weights = "adapter_model.safetensors"
    assert (dest / weights).read_bytes() == (out / "adapter" / weights).read_bytes()
    readme = (dest / "README.md").read_text()
    assert "load_model('tiny-llama')" in readme and "PeftModel.from_pretrained" in readme
    assert "merged/" in readme


def test_reloaded_adapter_gives_the_runs_val_loss(exported):
    _, _, summary, dest, setup = exported
    base, _ = load_model("tiny-llama")
    # Control: the bare base scores the run's initial loss, far from the trained one.
    assert val_loss(base, setup) == pytest.approx(summary["initial_val_loss"], abs=1e-5)
    assert abs(summary["initial_val_loss"] - summary["val_loss"]) > 1e-3
    model = PeftModel.from_pretrained(base, str(dest))
    model.eval()
    assert val_loss(model, setup) == pytest.approx(summary["val_loss"], abs=1e-5)


def test_merged_model_gives_the_same_loss_without_peft(exported):
    _, _, summary, dest, setup = exported
    model = AutoModelForCausalLM.from_pretrained(dest / "merged")
    model.eval()
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert val_loss(model, setup) == pytest.approx(summary["val_loss"], abs=1e-5)
    tok = AutoTokenizer.from_pretrained(dest / "merged")
    assert tok.eos_token_id == setup.tokenizer.eos_token_id and len(tok) == len(setup.tokenizer)


def test_export_refuses_to_overwrite_and_needs_an_adapter(exported, tmp_path):
    _, out, _, dest, _ = exported
    result = runner.invoke(app, ["export", str(out), str(dest)])
    assert result.exit_code == 2 and "not empty" in result.output
    (tmp_path / "config.yaml").write_text((out / "config.yaml").read_text())
    result = runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "x")])
    assert result.exit_code == 2 and "adapter" in result.output
