"""``splitcom eval``: merged-adapter beam search on tiny-llama, the files it writes, and their scores."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_cfg
from typer.testing import CliRunner

from splitcom.cli import app
from splitcom.data.records import Example, format_prompt
from splitcom.errors import UserError
from splitcom.evaluate import generate as gen_mod
from splitcom.evaluate.generate import (
    GenerationSettings,
    eval_examples,
    generate,
    generate_with_stats,
    group_inputs,
    load_adapted,
    load_merged,
    pick_threads,
    score_model,
)
from splitcom.evaluate.score import read_hyps, read_refs, score_files
from splitcom.federation.simulation import run

runner = CliRunner()
FAST = ["--max-samples", "3", "--beams", "2", "--max-new-tokens", "8", "--no-java"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(**{"train.epochs": 1, "data.max_train_samples": 24, "data.max_eval_samples": 8})
    run(cfg, out, progress=False)
    return cfg, out


def ex(prompt, completion, group=None):
    return Example(prompt, completion, group or prompt)


def test_group_inputs_keeps_first_appearance_order_and_all_references():
    examples = [ex("a", "A1"), ex("b", "B1"), ex("a", " A2 \n x"), ex("c", "C1"), ex("b", "B2")]
    inputs = group_inputs(examples)
    assert [(i.source, i.refs) for i in inputs] == [("a", ["A1", "A2 x"]), ("b", ["B1", "B2"]), ("c", ["C1"])]
    capped = group_inputs(examples, max_inputs=2)
    assert [(i.source, i.refs) for i in capped] == [("a", ["A1", "A2 x"]), ("b", ["B1", "B2"])]
    # Groups are the key, not the text: two entries with the same input stay two inputs.
    assert len(group_inputs([ex("a", "1", "g1"), ex("a", "2", "g2")])) == 2
    with pytest.raises(UserError, match="two different inputs"):
        group_inputs([ex("a", "1", "g"), ex("b", "2", "g")])


def test_eval_writes_predictions_references_and_scores(tiny_run):
    cfg, out = tiny_run
    result = runner.invoke(app, ["eval", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "BLEU:" in result.stdout
    ev = out / "eval"
    scores = json.loads((ev / "scores.json").read_text())
    preds = read_hyps(ev / "predictions.txt")
    refs = read_refs(ev / "references.txt")
    dev = eval_examples(cfg.data.dataset, "dev", cfg.data.synthetic_size, cfg.train.seed)
    expected = group_inputs(dev, 3)
    assert len(preds) == 3 and scores["n_inputs"] == 3
    assert refs == [i.refs for i in expected]
    assert any(len(r) > 1 for r in refs)  # multi-reference groups survive the file round trip
    assert (ev / "inputs.txt").read_text().splitlines() == [i.source for i in expected]
    assert scores["n_references"] == sum(len(r) for r in refs)
    assert scores["generation"] == {"num_beams": 2, "length_penalty": 0.8, "no_repeat_ngram_size": 4,
                                    "max_new_tokens": 8, "batch_size": 8, "threads": 0}
    assert scores["gen_inputs"] == 3 and 0 < scores["gen_tokens"] <= 3 * 8 and scores["gen_seconds"] > 0
    assert scores["tokens_per_s"] == pytest.approx(scores["gen_tokens"] / scores["gen_seconds"])
    assert scores["gen_threads"] >= 1 and "tokens/s" in result.output
    assert scores["model"] == "tiny-llama" and scores["split"] == "dev" and scores["merged"] is True
    assert scores["adapter"] == str((out / "adapter").resolve())
    # `splitcom score` on the written files gives the same figures.
    again = score_files(ev / "references.txt", ev / "predictions.txt", use_java=False)
    for name in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):
        assert again[name] == pytest.approx(scores[name], abs=1e-12), name


def test_greedy_generation_matches_a_manual_argmax_loop(tiny_run):
    """generate() on the merged model == step-by-step argmax of the unmerged PEFT model."""
    _, out = tiny_run
    _, merged, tok = load_merged(out)
    _, peft_model, _ = load_adapted(out)
    sources = ["name[The Eagle], eatType[pub]",
               "name[Zizzi], food[French], area[riverside], near[Café Rouge]"]
    settings = GenerationSettings(num_beams=1, no_repeat_ngram_size=0, max_new_tokens=6, batch_size=2)
    got, stats = generate_with_stats(merged, tok, sources, settings)
    n_tokens = 0
    for source, text in zip(sources, got, strict=True):
        ids = tok(format_prompt(source), add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(settings.max_new_tokens):
                nxt = int(peft_model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert text == " ".join(tok.decode(new, skip_special_tokens=True).split())
        n_tokens += len(new)
    assert (stats.inputs, stats.tokens) == (2, n_tokens)  # tokens/s counts output tokens up to eos


def test_decode_uses_the_kv_cache_despite_the_training_config(tiny_run):
    """load_model sets use_cache=False for training; generation must still feed one new token per step."""
    _, out = tiny_run
    _, merged, tok = load_merged(out)
    assert merged.config.use_cache is False
    widths = []
    forward = merged.forward

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    merged.forward = spy
    generate(merged, tok, ["name[The Eagle], eatType[pub]"],
             GenerationSettings(num_beams=2, no_repeat_ngram_size=0, max_new_tokens=5))
    assert widths[0] > 1 and len(widths) > 1 and set(widths[1:]) == {1}


def test_left_padded_batches_match_one_at_a_time(tiny_run):
    _, out = tiny_run
    _, merged, tok = load_merged(out)
    sources = [i.source for i in group_inputs(eval_examples("synthetic", "dev", 1200, 0), 6)]
    lengths = [len(tok(format_prompt(s))["input_ids"]) for s in sources]
    assert lengths != sorted(lengths)  # batches run in length order: outputs must come back in input order
    one = generate(merged, tok, sources, GenerationSettings(num_beams=2, max_new_tokens=8, batch_size=1))
    batched = generate(merged, tok, sources, GenerationSettings(num_beams=2, max_new_tokens=8, batch_size=4))
    assert one == batched
    pinned = generate(merged, tok, sources, GenerationSettings(num_beams=2, max_new_tokens=8, batch_size=4,
                                                               threads=1))
    assert pinned == batched


def test_score_model_in_memory_leaves_the_callers_peft_model_alone(tiny_run):
    _, out = tiny_run
    _, merged, tok = load_merged(out)
    _, peft_model, _ = load_adapted(out)
    peft_model.train()
    inputs = group_inputs(eval_examples("synthetic", "dev", 1200, 0), 3)
    settings = GenerationSettings(num_beams=2, max_new_tokens=8)
    preds, scores = score_model(peft_model, tok, inputs, settings, use_java=False)
    assert preds == generate(merged, tok, [i.source for i in inputs], settings)
    assert scores["n_inputs"] == 3 and scores["METEOR"] is None and scores["tokens_per_s"] > 0
    assert peft_model.training and any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_pick_threads_uses_idle_cores(monkeypatch):
    cores = len(gen_mod.os.sched_getaffinity(0))
    assert pick_threads(3, 1) == 3  # asked for: used as is
    monkeypatch.setattr(gen_mod, "busy_cores", lambda: 0)
    assert pick_threads(0, 64) == cores and pick_threads(0, 1) == 1
    monkeypatch.setattr(gen_mod, "busy_cores", lambda: cores)
    assert pick_threads(0, 64) == 1


def test_eval_on_another_dataset_reads_only_its_dev_split(tiny_run, tmp_path):
    """DART has no train file here; `--dataset dart:DIR` evaluates on its dev split alone."""
    _, out = tiny_run
    entries = [{"tripleset": [["A", "p", "B"]], "annotations": [{"source": "x", "text": "A p B."},
                                                                {"source": "x", "text": "B is p of A."}]},
               {"tripleset": [["C", "q", "D"]], "annotations": [{"source": "x", "text": "C q D."}]}]
    (tmp_path / "dart-v1.1.1-full-dev.json").write_text(json.dumps(entries), encoding="utf-8")
    result = runner.invoke(app, ["eval", str(out), "--dataset", f"dart:{tmp_path}", *FAST])
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "eval" / "scores.json").read_text())
    assert (scores["n_inputs"], scores["n_references"]) == (2, 3)
    assert read_refs(out / "eval" / "references.txt") == [["A p B.", "B is p of A."], ["C q D."]]


@pytest.mark.parametrize("args, needle", [
    (["--split", "test"], "--split"),
    (["--beams", "0"], "--beams"),
    (["--threads", "-1"], "--threads"),
    (["--max-samples", "0"], "--max-samples"),
])
def test_eval_bad_arguments_exit_2(tiny_run, args, needle):
    _, out = tiny_run
    result = runner.invoke(app, ["eval", str(out), *args])
    assert result.exit_code == 2 and needle in result.output, result.output


def test_eval_needs_a_run_directory(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "config.yaml" in result.output
