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
``scores.json`` (metrics, counts, model, adapter path, generation settings, and the decode's
seconds, output tokens and tokens/s).

Speed on a small CPU. A decode step reads every weight once whatever the number of rows, so rows
are cheap in bulk (smollm2-135m, 2 idle cores: 84 ms a step for 4 rows, 215 ms for 64, 6x less per
row). Hence one ``generate`` call per ``batch_size`` inputs (x beams rows), left-padded, with the KV
cache (``use_cache=True``; the model config's ``use_cache=False`` is for training, and generate in
transformers 5 ignores it anyway), on the merged base (no LoRA matmuls). Inputs run in order of prompt
length, so a batch holds similar prompts (less padding, beams that finish together); outputs come
back in input order. On a shared machine the thread count matters most: with the cores busy, a
2-thread matmul waits at every OpenMP barrier for a descheduled sibling (8 E2E inputs at beam 4:
194 s with 2 threads, 18 s with 1, same outputs). ``threads=0`` (the default) picks, before each
batch, as many threads as there are idle cores (at least 1, at most torch's setting). fp32 stays:
without AVX512-BF16 or AMX, bf16 matmuls on CPU are slower, and they would change the outputs.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitcom.config import Config, data_seed, load_config
from splitcom.data import dart, e2e, load_dataset, webnlg
from splitcom.data.records import Example, format_prompt
from splitcom.data.tokenize import render
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
    threads: int = 0  # torch threads while decoding; 0: the idle cores, re-read before each batch

    def check(self) -> None:
        for name, option in (("num_beams", "--beams"), ("max_new_tokens", "--max-new-tokens"),
                             ("batch_size", "--batch-size")):
            if getattr(self, name) < 1:
                raise UserError(f"must be >= 1 (got {getattr(self, name)})", where=option)
        if self.no_repeat_ngram_size < 0:
            raise UserError(f"must be >= 0 (got {self.no_repeat_ngram_size})", where="--no-repeat-ngram")
        if self.threads < 0:
            raise UserError(f"must be >= 0 (got {self.threads})", where="--threads")


@dataclass(frozen=True)
class GenerationStats:
    """What one decode cost: output tokens are those of the returned texts (up to their eos)."""

    inputs: int
    tokens: int
    seconds: float
    threads: int  # the most threads any batch ran with

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"gen_inputs": self.inputs, "gen_tokens": self.tokens, "gen_seconds": self.seconds,
                "tokens_per_s": self.tokens_per_s, "gen_threads": self.threads}


@dataclass(frozen=True)
class Input:
    """One distinct input: the prompt source and every reference written for it."""

    group: str
    source: str
    refs: list[str]
    chat: tuple[tuple[str, str], ...] | None = None  # chat data: the prompt messages (see data/tokenize.render)

    def prompt(self, tokenizer) -> str:
        """The text the model is conditioned on, exactly as in training."""
        return render(Example(self.source, "", self.group, chat=self.chat), tokenizer)[0]


def group_inputs(examples: list[Example], max_inputs: int | None = None) -> list[Input]:
    """Examples -> distinct inputs in order of first appearance, references gathered per ``group``."""
    by_group: dict[str, Input] = {}
    for ex in examples:
        item = by_group.get(ex.group)
        if item is None:
            if max_inputs is not None and len(by_group) >= max_inputs:
                continue
            item = by_group[ex.group] = Input(ex.group, ex.prompt, [], ex.chat)
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


def eval_examples(spec: str, split: str, synthetic_size: int, seed: int, data=None) -> list[Example]:
    """The examples of one split. Directory datasets read that split alone; others go via LOADERS
    (``data``: the run's data config, for its own files' field names and dev split)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; known: {list(SPLITS)}", where="--split")
    kind, _, arg = spec.partition(":")
    if kind in SPLIT_LOADERS and arg:
        return SPLIT_LOADERS[kind](arg, split)
    train, val = load_dataset(spec, synthetic_size, seed, data if data is not None and spec == data.dataset else None)
    return val if split == "dev" else train


def busy_cores(samples: int = 5, interval_s: float = 0.02) -> int:
    """Threads of other processes running or runnable now: the median of a few reads of the
    instantaneous count in /proc/loadavg, less this reader. 0 where that file does not exist."""
    path = Path("/proc/loadavg")
    if not path.is_file():
        return 0
    counts = []
    for i in range(samples):
        if i:
            time.sleep(interval_s)
        counts.append(int(path.read_text().split()[3].split("/")[0]) - 1)
    return max(0, sorted(counts)[len(counts) // 2])


def pick_threads(requested: int, most: int) -> int:
    """``requested``, or for 0 the idle cores (1 to ``most``): oversubscribed OpenMP threads are far
    slower than fewer threads, see the module docstring."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(most, cores - busy_cores()))


def _output_tokens(row: list[int], eos: int | None) -> int:
    """Tokens of one output up to (not including) its eos; padding comes only after an eos."""
    return row.index(eos) if eos is not None and eos in row else len(row)


@torch.inference_mode()
def generate_with_stats(model, tokenizer, sources: list[str], settings: GenerationSettings,
                        device: torch.device | str = "cpu",
                        prompts: list[str] | None = None) -> tuple[list[str], GenerationStats]:
    """Beam-search outputs, one line each, for prompts formatted as in training (``prompts``: texts
    already rendered, e.g. by a chat template), and what they cost."""
    settings.check()
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    eos = tokenizer.eos_token_id
    texts = prompts if prompts is not None else [format_prompt(s) for s in sources]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Similar lengths share a batch; a stable sort keeps file order among equals.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outputs: list[str] = [""] * len(ids)
    tokens, used, most = 0, 0, torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        for start in range(0, len(order), settings.batch_size):
            chunk = order[start : start + settings.batch_size]
            threads = pick_threads(settings.threads, most)
            torch.set_num_threads(threads)
            used = max(used, threads)
            t = max(len(ids[i]) for i in chunk)
            # Left padding: every prompt ends at the same position, so generation continues all of them.
            input_ids = torch.tensor([[pad] * (t - len(ids[i])) + ids[i] for i in chunk], device=device)  # [B, T]
            mask = torch.tensor([[0] * (t - len(ids[i])) + [1] * len(ids[i]) for i in chunk],
                                device=device)  # [B, T]
            out = model.generate(input_ids=input_ids, attention_mask=mask, num_beams=settings.num_beams,
                                 length_penalty=settings.length_penalty,
                                 no_repeat_ngram_size=settings.no_repeat_ngram_size,
                                 max_new_tokens=settings.max_new_tokens, early_stopping=True, do_sample=False,
                                 num_return_sequences=1, pad_token_id=pad, eos_token_id=eos,
                                 use_cache=True)  # [B, T + new]
            for i, row in zip(chunk, out[:, t:].tolist(), strict=True):
                tokens += _output_tokens(row, eos)
                text = tokenizer.decode(row, skip_special_tokens=True)
                outputs[i] = " ".join(text.split())  # one line per output, whatever the model emits
    finally:
        torch.set_num_threads(most)
    return outputs, GenerationStats(len(ids), tokens, time.perf_counter() - t0, used)


def generate(model, tokenizer, sources: list[str], settings: GenerationSettings,
             device: torch.device | str = "cpu") -> list[str]:
    """Beam-search outputs, one line each, for prompts formatted as in training."""
    return generate_with_stats(model, tokenizer, sources, settings, device)[0]


def score_model(model, tokenizer, inputs: list[Input], settings: GenerationSettings | None = None,
                device: torch.device | str = "cpu", use_java: bool = True) -> tuple[list[str], dict]:
    """(outputs, scores) of a model in memory on ``inputs``: E2E metrics, counts and decode cost.

    A PEFT model is merged into a copy first (the caller's model keeps its adapters); a plain model
    is used as it is, in eval mode for the call."""
    settings = settings or GenerationSettings()
    if not inputs:
        raise UserError("no inputs with references to score")
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    was_training = model.training
    model.eval()
    try:
        preds, stats = generate_with_stats(model, tokenizer, [item.source for item in inputs], settings, device,
                                           [item.prompt(tokenizer) for item in inputs])
    finally:
        model.train(was_training)
    scores = compute_metrics(preds, [item.refs for item in inputs], use_java=use_java)
    return preds, {**scores, "n_inputs": len(inputs), "n_references": sum(len(item.refs) for item in inputs),
                   "generation": asdict(settings), "empty_outputs": sum(1 for p in preds if not p),
                   **stats.as_dict()}


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
    inputs = group_inputs(eval_examples(spec, split, cfg.data.synthetic_size, data_seed(cfg), cfg.data), max_samples)
    if not inputs:
        raise UserError(f"no {split} inputs with references", where=spec)
    dev = resolve_device(device or cfg.train.device)
    _, model, tok = load_merged(out, cfg)
    model.to(dev)
    preds, scores = score_model(model, tok, inputs, settings, dev, use_java=use_java)

    eval_dir = Path(out) / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "predictions.txt").write_text("".join(p + "\n" for p in preds), encoding="utf-8")
    (eval_dir / "inputs.txt").write_text("".join(item.source + "\n" for item in inputs), encoding="utf-8")
    write_references(eval_dir / "references.txt", inputs)
    result = {
        **scores,
        "split": split,
        "max_samples": max_samples,
        "dataset": spec,
        "model": cfg.model.name,
        "adapter": str(adapter_dir(out).resolve()),
        "merged": True,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(eval_dir / "scores.json", result)
    return result
