"""Tokenisation with the loss on the completion only, and right-padded dynamic batches.

Right padding matters for exact splitting: with causal attention a real token never attends to a
pad that comes after it, so real-token activations do not depend on the pad and only the real
tokens need to cross the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitcom.data.records import Example, format_prompt

IGNORE = -100  # label value excluded from the loss (the HF convention)


@dataclass(frozen=True)
class Sample:
    sample_id: int  # stable index of the example in its split: the key of every per-sample cache
    ids: tuple[int, ...]
    labels: tuple[int, ...]  # == ids on completion tokens, IGNORE on prompt tokens


@dataclass
class Batch:
    sample_ids: list[int]
    input_ids: torch.Tensor  # [B, T] right-padded
    labels: torch.Tensor  # [B, T] IGNORE on prompt and pad
    lengths: list[int]  # real tokens per sample, T_i

    @property
    def attention_mask(self) -> torch.Tensor:  # [B, T]
        t = self.input_ids.shape[1]
        return (torch.arange(t)[None, :] < torch.tensor(self.lengths)[:, None]).long()

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))


def render(ex: Example, tokenizer) -> tuple[str, str]:
    """(prompt text, completion text) as the model sees them; the completion follows the prompt directly.

    A chat example's prompt is the tokenizer's chat template with the generation prompt, which already
    ends where the reply starts, so the reply follows without a space; without a template it is the
    plain rendering (ending in ``assistant:``). Neither goes through format_prompt.
    """
    if ex.chat is None:
        return format_prompt(ex.prompt), " " + ex.completion
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": role, "content": content} for role, content in ex.chat]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, ex.completion
    return ex.prompt, " " + ex.completion


def tokenize(examples: Sequence[Example], tokenizer, max_length: int) -> list[Sample]:
    eos = tokenizer.eos_token_id
    out = []
    for i, ex in enumerate(examples):
        prompt, completion = render(ex, tokenizer)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if eos is not None:
            c = c + [eos]
        p = p[: max(1, max_length - 2)]  # keep at least one completion token to learn from
        c = c[: max_length - len(p)]
        out.append(Sample(i, tuple(p + c), tuple([IGNORE] * len(p) + c)))
    return out


def collate(samples: Sequence[Sample], pad_id: int) -> Batch:
    t = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), t), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, : len(s.ids)] = torch.tensor(s.ids)
        labels[row, : len(s.labels)] = torch.tensor(s.labels)
    return Batch([s.sample_id for s in samples], ids, labels, [len(s.ids) for s in samples])


def batches(samples: Sequence[Sample], batch_size: int, pad_id: int) -> list[Batch]:
    return [collate(samples[i : i + batch_size], pad_id) for i in range(0, len(samples), batch_size)]
