"""``splitcom export OUT DIR [--merged]``: the run's aggregated adapter for use outside SplitCom.

``DIR`` becomes a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``)
that ``PeftModel.from_pretrained(base, DIR)`` loads, with the tokenizer beside it and a README that
says which base to load. ``base_model_name_or_path`` is what plain PEFT/HF code loads without SplitCom:
the HF id of the run's model (an alias says what it was converted from: ``smollm2-135m`` is
``HuggingFaceTB/SmolLM2-135M-Instruct``), an absolute local directory, or for a random-init test alias
(``tiny-llama``, ...) ``DEST/base``, where its weights are written. ``--merged`` also writes
``DIR/merged/``: the base with the adapter merged in (``merge_and_unload``), a plain HF model.

The adapter files are copied byte for byte from ``OUT/adapter``, so the exported adapter is exactly
the one the run validated.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from splitcom.errors import UserError
from splitcom.evaluate.generate import adapter_dir, load_merged, run_config
from splitcom.models.load import ALIASES, load_model

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_HF_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what an alias was converted from


def base_name(name: str, dest: Path | None = None) -> str:
    """What ``base_model_name_or_path`` should say, so that plain PEFT/HF code loads it without SplitCom: the HF
    id an alias was converted from, an absolute local path, or (a random-init test alias) ``DEST/base``."""
    if name in _HF_IDS:
        return _HF_IDS[name]
    if name in ALIASES:
        return str((dest / "base").resolve()) if dest is not None else name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def readme(name: str, base: str, merged: bool) -> str:
    if name in _HF_IDS:
        load_base = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                     f"# {base!r} from the Hub, or offline the dequantised copy SplitCom keeps in\n"
                     f"# ~/.cache/splitcom/{name} (the same weights, as safetensors)\n"
                     f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
                     f"tokenizer = AutoTokenizer.from_pretrained({base!r})")
    elif name in ALIASES:
        load_base = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                     f"# SplitCom's {name!r} is a random-init test model: its weights are in base/ here\n"
                     f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
                     f"tokenizer = AutoTokenizer.from_pretrained({base!r})")
    else:
        load_base = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                     f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
                     f"tokenizer = AutoTokenizer.from_pretrained({base!r})")
    text = f"""# SplitCom LoRA adapter

The aggregated (global) LoRA adapter of a SplitCom run, as a PEFT adapter directory.
Base model: `{base}`.

```python
from peft import PeftModel
{load_base}
model = PeftModel.from_pretrained(base, "path/to/this/dir")
model = model.merge_and_unload()  # optional: fold the adapter into the base weights
```

Prompts are formatted as in training: `"Input: {{linearised input}}\\nOutput:"`; the model continues
with `" " + text` and the end-of-sequence token. The tokenizer files here are those of the base.
"""
    if merged:
        text += """
`merged/` holds the base with the adapter merged in, a plain Hugging Face model:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir/merged")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir/merged")
```
"""
    return text


def export_run(out: str | Path, dest: str | Path, merged: bool = False, force: bool = False) -> list[Path]:
    """Write the adapter (and optionally the merged model) to ``dest``; returns the files written."""
    out, dest = Path(out), Path(dest)
    cfg = run_config(out)
    src = adapter_dir(out)
    for name in ADAPTER_FILES:
        if not (src / name).is_file():
            raise UserError(f"adapter file {name} missing", where=str(src))
    if dest.exists() and not dest.is_dir():
        raise UserError("export destination exists and is not a directory", where=str(dest))
    if dest.exists() and any(dest.iterdir()) and not force:
        raise UserError("export destination is not empty (use --force to overwrite)", where=str(dest))
    if dest.resolve() == src.resolve():
        raise UserError("export destination is the run's own adapter directory", where=str(dest))
    dest.mkdir(parents=True, exist_ok=True)

    base = base_name(cfg.model.name, dest)
    adapter_cfg = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    adapter_cfg["base_model_name_or_path"] = base
    written = [dest / "adapter_config.json", dest / "adapter_model.safetensors", dest / "README.md"]
    written[0].write_text(json.dumps(adapter_cfg, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(src / "adapter_model.safetensors", written[1])
    written[2].write_text(readme(cfg.model.name, base, merged), encoding="utf-8")

    if merged:
        from transformers.utils import logging as hf_logging

        _, model, tok = load_merged(out, cfg)
        model.config.use_cache = True  # SplitCom turns the KV cache off for training; deployment wants it
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # one shard; a progress bar would only clutter the CLI
        try:
            model.save_pretrained(dest / "merged")
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        tok.save_pretrained(dest / "merged")
        written.append(dest / "merged")
    if cfg.model.name in ALIASES and cfg.model.name not in _HF_IDS:  # no HF id to name: ship the base
        base_model, tok = load_model(cfg.model.name, cfg.model.cache_dir)
        base_model.save_pretrained(dest / "base")
        tok.save_pretrained(dest / "base")
        written.append(dest / "base")
    elif not merged:
        _, tok = load_model(cfg.model.name, cfg.model.cache_dir)
    tok.save_pretrained(dest)
    return written
