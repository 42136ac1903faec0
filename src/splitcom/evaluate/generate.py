"""``splitcom eval OUT``: generate with the aggregated adapter merged onto the base, and score.

The model is rebuilt from the run's own ``config.yaml`` (same base, same dataset spec), the global
adapter in ``OUT/adapter`` is loaded with PEFT and merged (``merge_and_unload``), so generation runs
at the base model's speed. Outputs are generated once per *distinct input* (one ``group``), with
beam search, and scored against all the references of that input, as the E2E challenge does.

The inputs are those of the whole split (``--split dev``: the validation examples), not the
``data.max_eval_samples`` subset the run validated on: a random subset of *examples* would cut
reference groups apart. ``--max-samples N`` keeps the first N distinct inputs in file order, and
``--dataset SPEC`` evaluates on another dataset's split (``dart:DIR`` needs only its dev file).

Files written to ``OUT/eval/``: ``predictions.txt`` (one output per line), ``references.txt`` (the
references of each input on consecutive lines, a blank line between inputs: the format of
``splitcom score`` and the E2E script), ``inputs.txt`` (the linearised input of each line) and
``scores.json`` (metrics, counts, model, adapter path and generation settings).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitcom.config import Config, load_config
from splitcom.data import dart, e2e, load_dataset, webnlg
from splitcom.data.records import Example, format_prompt
from splitcom.errors import UserError
from splitcom.evaluate.metrics import compute_metrics
from splitcom.models.load import load_model, resolve_device
from splitcom.runlog import write_json

SPLITS = ("dev", "train")
# Directory datasets whose splits can be read one at a time (eval of `dart:DIR`, which has no train).
SPLIT_LOADERS = {"e2e": e2e.load_split, "webnlg": webnlg.load_split, "dart": dart.load_split}


@dataclass(frozen=True)
class GenerationSettings:
    """Beam search as in the LoRA / prefix-tuning E2E experiments."""

    num_beams: int = 10
    length_penalty: float = 0.8
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 64
    batch_size: int = 8  # inputs per generate() call (left-padded)

    def check(self) -> None:
        for name, option in (("num_beams", "--beams"), ("max_new_tokens", "--max-new-tokens"),
                             ("batch_size", "--batch-size")):
            if getattr(self, name) < 1:
                raise UserError(f"must be >= 1 (got {getattr(self, name)})", where=option)
        if self.no_repeat_ngram_size < 0:
            raise UserError(f"must be >= 0 (got {self.no_repeat_ngram_size})", where="--no-repeat-ngram")


@dataclass(frozen=True)
class Input:
    """One distinct input: the prompt source and every reference written for it."""

    group: str
    source: str
    refs: list[str]


def group_inputs(examples: list[Example], max_inputs: int | None = None) -> list[Input]:
    """Examples -> distinct inputs in order of first appearance, references gathered per ``group``."""
    by_group: dict[str, Input] = {}
    for ex in examples:
        item = by_group.get(ex.group)
        if item is None:
            if max_inputs is not None and len(by_group) >= max_inputs:
                continue
            item = by_group[ex.group] = Input(ex.group, ex.prompt, [])
        elif item.source != ex.prompt:
            raise UserError(f"group {ex.group!r} has two different inputs", where="data.dataset")
        text = " ".join(ex.completion.split())
        if text:
            item.refs.append(text)
    return [item for item in by_group.values() if item.refs]


def run_config(out: str | Path) -> Config:
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise UserError("not a run directory (no config.yaml)", where=str(out))
    return load_config(path)


def adapter_dir(out: str | Path) -> Path:
    path = Path(out) / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise UserError("run has no saved adapter (adapter/adapter_config.json missing)", where=str(out))
    return path


def load_adapted(out: str | Path, cfg: Config | None = None):
    """(cfg, PeftModel with the run's global adapter as ``default``, tokenizer), in eval mode."""
    from peft import PeftModel

    cfg = cfg or run_config(out)
    base, tok = load_model(cfg.model.name, cfg.model.cache_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir(out)), adapter_name="default")
    model.eval()
    return cfg, model, tok


def load_merged(out: str | Path, cfg: Config | None = None):
    """(cfg, base model with the adapter merged into its weights, tokenizer): a plain HF model."""
    cfg, model, tok = load_adapted(out, cfg)
    merged = model.merge_and_unload()
    merged.eval()
    return cfg, merged, tok


def eval_examples(spec: str, split: str, synthetic_size: int, seed: int) -> list[Example]:
    """The examples of one split. Directory datasets read that split alone; others go via LOADERS."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; known: {list(SPLITS)}", where="--split")
    kind, _, arg = spec.partition(":")
    if kind in SPLIT_LOADERS and arg:
        return SPLIT_LOADERS[kind](arg, split)
    train, val = load_dataset(spec, synthetic_size, seed)
    return val if split == "dev" else train


@torch.no_grad()
def generate(model, tokenizer, sources: list[str], settings: GenerationSettings,
             device: torch.device | str = "cpu") -> list[str]:
    """Beam-search outputs, one line each, for prompts formatted as in training."""
    settings.check()
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    outputs: list[str] = []
    for start in range(0, len(sources), settings.batch_size):
        chunk = sources[start : start + settings.batch_size]
        ids = [tokenizer(format_prompt(s), add_special_tokens=False)["input_ids"] for s in chunk]
        t = max(len(x) for x in ids)
        # Left padding: every prompt ends at the same position, so generation continues all of them.
        input_ids = torch.tensor([[pad] * (t - len(x)) + x for x in ids], device=device)  # [B, T]
        mask = torch.tensor([[0] * (t - len(x)) + [1] * len(x) for x in ids], device=device)  # [B, T]
        out = model.generate(input_ids=input_ids, attention_mask=mask, num_beams=settings.num_beams,
                             length_penalty=settings.length_penalty,
                             no_repeat_ngram_size=settings.no_repeat_ngram_size,
                             max_new_tokens=settings.max_new_tokens, early_stopping=True, do_sample=False,
                             num_return_sequences=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             use_cache=True)  # [B, T + new]
        for row in out[:, t:]:
            text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            outputs.append(" ".join(text.split()))  # one line per output, whatever the model emits
    return outputs


def write_references(path: Path, inputs: list[Input]) -> None:
    path.write_text("\n\n".join("\n".join(item.refs) for item in inputs) + "\n", encoding="utf-8")


def evaluate_run(out: str | Path, split: str = "dev", max_samples: int | None = None,
                 settings: GenerationSettings | None = None, dataset: str | None = None,
                 device: str | None = None, use_java: bool = True) -> dict:
    """Generate for the distinct inputs of a split, write OUT/eval/*, return scores.json's dict."""
    settings = settings or GenerationSettings()
    settings.check()
    if max_samples is not None and max_samples < 1:
        raise UserError(f"must be >= 1 (got {max_samples})", where="--max-samples")
    t0 = time.perf_counter()
    cfg = run_config(out)
    spec = dataset or cfg.data.dataset
    inputs = group_inputs(eval_examples(spec, split, cfg.data.synthetic_size, cfg.train.seed), max_samples)
    if not inputs:
        raise UserError(f"no {split} inputs with references", where=spec)
    dev = resolve_device(device or cfg.train.device)
    _, model, tok = load_merged(out, cfg)
    model.to(dev)
    preds = generate(model, tok, [item.source for item in inputs], settings, dev)

    eval_dir = Path(out) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "predictions.txt").write_text("".join(p + "\n" for p in preds), encoding="utf-8")
    (eval_dir / "inputs.txt").write_text("".join(item.source + "\n" for item in inputs), encoding="utf-8")
    write_references(eval_dir / "references.txt", inputs)
    scores = compute_metrics(preds, [item.refs for item in inputs], use_java=use_java)
    result = {
        **scores,
        "n_inputs": len(inputs),
        "n_references": sum(len(item.refs) for item in inputs),
        "split": split,
        "dataset": spec,
        "model": cfg.model.name,
        "adapter": str(adapter_dir(out).resolve()),
        "merged": True,
        "generation": asdict(settings),
        "empty_outputs": sum(1 for p in preds if not p),
        "wall_s": time.perf_counter() - t0,
    }
    write_json(eval_dir / "scores.json", result)
    return result
