"""Stages of a causal LM that reproduce the unsplit HF forward exactly.

A stage runs decoder blocks ``[start, end)`` on hidden states ``[B, T, H]``; ``embed`` and ``logits``
bracket them. The attention mask, position ids and rotary embeddings are rebuilt on each side from
the per-sample lengths alone (batches are right-padded), using HF's own mask builders, so the
stages match the HF model whatever attention implementation it uses.

Families form a small registry keyed by ``config.model_type``: add one by writing a class with the
five methods of ``Family``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from splitcom.data.tokenize import IGNORE

_LAYER_RE = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def layer_index(param_name: str) -> int | None:
    """Decoder block index of a parameter name, or None for parameters outside the blocks."""
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM inside a PEFT wrapper (LoRA is injected in place, so it runs through it)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if inner is not None and hasattr(base, "peft_config") else model


class Family(ABC):
    lora_targets: tuple[str, ...] = ()

    @abstractmethod
    def embed(self, lm, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def layers(self, lm) -> Sequence[torch.nn.Module]: ...

    @abstractmethod
    def context(self, lm, h: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> Any: ...

    @abstractmethod
    def run_layer(self, lm, idx: int, layer, h: torch.Tensor, ctx: Any) -> torch.Tensor: ...

    @abstractmethod
    def logits(self, lm, h: torch.Tensor) -> torch.Tensor: ...


class LlamaFamily(Family):
    """Llama, Mistral, Qwen2 (and SmolLM): pre-norm blocks with rotary embeddings."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    def embed(self, lm, input_ids, position_ids):
        return lm.model.embed_tokens(input_ids)

    def layers(self, lm):
        return lm.model.layers

    def context(self, lm, h, attention_mask, position_ids):
        cfg = lm.model.config
        kw = dict(config=cfg, inputs_embeds=h, attention_mask=attention_mask, past_key_values=None,
                  position_ids=position_ids)
        masks = {"full_attention": create_causal_mask(**kw)}
        layer_types = getattr(cfg, "layer_types", None) or []
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
        elif getattr(cfg, "sliding_window", None) and cfg.model_type == "mistral":
            masks["full_attention"] = create_sliding_window_causal_mask(**kw)
        pe = lm.model.rotary_emb(h, position_ids=position_ids)
        return layer_types, masks, pe, position_ids

    def run_layer(self, lm, idx, layer, h, ctx):
        layer_types, masks, pe, position_ids = ctx
        mask = masks[layer_types[idx]] if layer_types else masks["full_attention"]
        return layer(h, attention_mask=mask, position_embeddings=pe, position_ids=position_ids)

    def logits(self, lm, h):
        return lm.lm_head(lm.model.norm(h))


class GPT2Family(Family):
    """GPT-2: learned absolute positions, Conv1D projections."""

    lora_targets = ("c_attn", "c_proj")

    def embed(self, lm, input_ids, position_ids):
        t = lm.transformer
        return t.drop(t.wte(input_ids) + t.wpe(position_ids))

    def layers(self, lm):
        return lm.transformer.h

    def context(self, lm, h, attention_mask, position_ids):
        return create_causal_mask(config=lm.transformer.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids), position_ids

    def run_layer(self, lm, idx, layer, h, ctx):
        mask, position_ids = ctx
        return layer(h, None, mask, None, encoder_attention_mask=None, use_cache=False,
                     position_ids=position_ids)

    def logits(self, lm, h):
        return lm.lm_head(lm.transformer.ln_f(h))


FAMILIES: dict[str, Family] = {
    "llama": LlamaFamily(), "mistral": LlamaFamily(), "qwen2": LlamaFamily(), "gpt2": GPT2Family(),
}


def family_of(model: torch.nn.Module) -> Family:
    return family_for(unwrap(model).config)


def family_for(config) -> Family:
    """The family of a model with this HF config."""
    mt = config.model_type
    if mt not in FAMILIES:
        from splitcom.errors import UserError

        raise UserError(f"model family {mt!r} is not supported; known: {sorted(FAMILIES)}", where="model.name")
    return FAMILIES[mt]


def mask_from_lengths(lengths: Sequence[int], t: int, device=None) -> torch.Tensor:  # [B, T]
    return (torch.arange(t, device=device)[None, :] < torch.tensor(list(lengths), device=device)[:, None]).long()


class SplitModel:
    """Callable slices of one (PEFT-wrapped) causal LM: ``embed``, ``run(start, end)``, ``logits``."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.lm = unwrap(model)
        self.family = family_of(model)
        self.num_layers = len(self.family.layers(self.lm))
        self.hidden_size = int(self.lm.config.hidden_size)

    def _ctx(self, h: torch.Tensor, lengths: Sequence[int]):
        b, t = h.shape[:2]
        position_ids = torch.arange(t, device=h.device).unsqueeze(0).expand(b, t)
        return self.family.context(self.lm, h, mask_from_lengths(lengths, t, h.device), position_ids)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, H]
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        return self.family.embed(self.lm, input_ids, pos)

    def run(self, h: torch.Tensor, lengths: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Decoder blocks [start, end) on right-padded hidden states [B, T, H]."""
        ctx = self._ctx(h, lengths)
        layers = self.family.layers(self.lm)
        for i in range(start, end):
            h = self.family.run_layer(self.lm, i, layers[i], h, ctx)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, V]
        return self.family.logits(self.lm, h)

    def head(self, input_ids: torch.Tensor, lengths: Sequence[int], cut: int) -> torch.Tensor:
        return self.run(self.embed(input_ids), lengths, 0, cut)

    def body(self, h: torch.Tensor, lengths: Sequence[int], cut: int) -> torch.Tensor:
        return self.logits(self.run(h, lengths, cut, self.num_layers))

    def full(self, input_ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        return self.body(self.head(input_ids, lengths, 0), lengths, 0)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (completion) tokens, as HF computes it."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="mean")


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed loss, token count): for token-weighted validation over many batches."""
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shift_labels,
                            ignore_index=IGNORE, reduction="sum")
    return total, int((shift_labels != IGNORE).sum())


def unpad(h: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """[B, T, H] -> per sample [T_i, H]: only real tokens go on the wire."""
    return [h[i, :n] for i, n in enumerate(lengths)]


def pad(rows: Sequence[torch.Tensor], t: int | None = None) -> torch.Tensor:
    """Per sample [T_i, H] -> zero right-padded [B, T, H]."""
    t = t or max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), t, rows[0].shape[1]))
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out
