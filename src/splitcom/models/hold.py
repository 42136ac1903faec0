"""A model that holds only some decoder blocks: what a deployed split client needs of the whole model.

A deployed SFL client runs the embedding, blocks [0, deepest cut it may take) and, in U-shape, its tail
blocks, the final norm and the LM head; the server runs the rest. The blocks it never runs are replaced by
``Dropped`` placeholders (no parameters; calling one fails, naming the block), so the block list keeps its
length: block indices, parameter names (adapter keys), ``config.num_hidden_layers`` and every count of
layers (check_cut, the fleet, the time model) stay those of the real model.

Two ways get there: ``load_model(..., blocks=...)`` builds a model of only the first N blocks from a
config with fewer layers, so the rest are never loaded (a low peak too), then ``pad_blocks`` puts
placeholders behind them; ``hold_only`` drops blocks of a whole model after loading (U-shape's tail sits at
the end of the checkpoint, random-init models draw every block's init in order), and frees them.
"""

from __future__ import annotations

import copy
import ctypes
import gc
from collections.abc import Collection

import torch

from splitcom.models.split import family_of, unwrap


class BlockNotHeld(RuntimeError):
    """A dropped part of the model was called: the process was built to hold other blocks."""


class Dropped(torch.nn.Module):
    """Stands in for a part of the model this process does not hold (a decoder block, an untied LM head)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise BlockNotHeld(f"{self.what} is not held by this process: a deployed split client keeps only the blocks "
                           "it may run (up to its deepest cut and, in U-shape, its tail)")

    def extra_repr(self) -> str:
        return f"{self.what}, not held"


def block_name(idx: int) -> str:
    return f"decoder block {idx}"


def truncated_config(config, num_blocks: int):
    """A copy of an HF config with only the first ``num_blocks`` decoder blocks."""
    short = copy.deepcopy(config)
    short.num_hidden_layers = num_blocks  # (gpt2's n_layer through its attribute map)
    return short


def pad_blocks(model: torch.nn.Module, num_layers: int) -> None:
    """Placeholders behind the blocks of a model built with fewer blocks, up to the real ``num_layers``; the
    config says ``num_layers`` again."""
    lm = unwrap(model)
    layers = family_of(model).layers(lm)
    layers.extend(Dropped(block_name(i)) for i in range(len(layers), num_layers))
    lm.config.num_hidden_layers = num_layers


def prefix_length(blocks: Collection[int]) -> int | None:
    """N when ``blocks`` is exactly [0, N) (a model of N blocks can be loaded), else None."""
    n = len(set(blocks))
    return n if set(blocks) == set(range(n)) else None


def hold_only(model: torch.nn.Module, blocks: Collection[int], head: bool) -> None:
    """Replace every decoder block outside ``blocks`` by a placeholder, and an LM head that is not tied to the
    embedding unless ``head``; the parameters they held are freed (a tied head is the embedding, kept)."""
    lm = unwrap(model)
    layers, keep = family_of(model).layers(lm), set(blocks)
    for i in range(len(layers)):
        if i not in keep and not isinstance(layers[i], Dropped):
            layers[i] = Dropped(block_name(i))
    out, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if not head and out is not None and not isinstance(out, Dropped) and out.weight is not emb.weight:
        lm.set_output_embeddings(Dropped("the LM head"))
    gc.collect()  # (the blocks' LoRA modules hold reference cycles)
    _trim()


def _trim() -> None:
    """Hand the freed heap back to the OS: glibc keeps what freed tensors of a few MB leave (for later
    allocations; measured on SmolLM2, a third of the dropped blocks), and RSS would still count it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def held_blocks(model: torch.nn.Module) -> list[int]:
    """Indices of the decoder blocks a model holds (not placeholders)."""
    return [i for i, b in enumerate(family_of(model).layers(unwrap(model))) if not isinstance(b, Dropped)]
