"""The one record every loader produces: a prompt, a completion, and attributes to partition by."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*")


@dataclass(frozen=True)
class Example:
    """One training/validation pair. ``group`` ties several references of one input together."""

    prompt: str  # linearised input (an E2E MR, WebNLG triples, ...)
    completion: str  # one reference text
    group: str  # key of the input; references of one input share it
    attrs: dict[str, str] = field(default_factory=dict, compare=False)
    # A chat example's prompt messages, ((role, content), ...); None for every other example. When set,
    # the model is conditioned on them as the tokenizer's chat template renders them (or on ``prompt``,
    # their plain rendering, without a template), verbatim: never through format_prompt.
    chat: tuple[tuple[str, str], ...] | None = None


def parse_mr(mr: str) -> dict[str, str]:
    """``name[The Eagle], food[French]`` -> {"name": "The Eagle", "food": "French"}."""
    return {m.group(1).strip(): m.group(2).strip() for m in _MR_ITEM.finditer(mr)}


def format_prompt(source: str) -> str:
    """The text the model is conditioned on; the completion follows it directly."""
    return f"Input: {source}\nOutput:"
