"""LoRA adapters via PEFT over one frozen base, with per-layer ownership.

PEFT injects LoRA once; every client gets a named adapter (``c0``, ``c1``, ...) over the same frozen
base weights, and ``default`` holds the aggregated global adapter. Each decoder block can run a
different adapter (client ``c3`` on the head blocks, ``shared`` on the server's blocks), which is how
one base serves every client without a model copy.

Adapter state travels under *canonical* names: the PEFT parameter name without the wrapper prefix
and without the adapter name (``model.layers.3.self_attn.q_proj.lora_A.weight``), so the same key
means the same matrix on every side and in every process.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from splitcom.models.split import family_of, layer_index

GLOBAL = "default"  # the aggregated adapter: evaluated, exported, and the start of every client copy
_PREFIX = "base_model.model."


def attach_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float,
                target_modules: list[str] | None = None) -> PeftModel:
    targets = list(target_modules or family_of(model).lora_targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2")
    peft_model = get_peft_model(model, cfg, adapter_name=GLOBAL)
    return peft_model


def rank_caps(cut_rank: int | None, cut: int, tail_start: int | None = None) -> dict[int, int]:
    """Blocks next to a client's cut (and, in U-shape, next to its tail) and their capped LoRA rank."""
    if cut_rank is None:
        return {}
    blocks = {cut - 1, cut} | (set() if tail_start is None else {tail_start - 1, tail_start})
    return {b: cut_rank for b in sorted(blocks)}


def _rank_axis(name: str) -> int | None:
    """The axis of a LoRA matrix that runs over rank components: rows of A [r, in], columns of B [out, r]."""
    return 0 if ".lora_A." in name else 1 if ".lora_B." in name else None


def truncate_ranks(state: dict[str, torch.Tensor], caps: dict[int, int]) -> dict[str, torch.Tensor]:
    """The first ``cap`` rank components of the capped blocks' matrices: what goes on the wire."""
    out = {}
    for name, t in state.items():
        cap, axis = caps.get(layer_index(name)), _rank_axis(name)
        out[name] = t.narrow(axis, 0, min(cap, t.shape[axis])).contiguous() if cap is not None and axis is not None \
            else t
    return out


class AdapterBank:
    """Named adapters over one PEFT model, addressed by decoder block.

    A block's LoRA rank can be capped per adapter (``cap_ranks``, the cut-layer rank of DESIGN 4.7): the
    rank components above the cap are held at exactly zero (a zero row of A with a zero column of B gets a
    zero gradient, so AdamW keeps both at zero), which makes the block a rank-``cap`` LoRA with scaling
    alpha/r. PEFT cannot change one adapter's rank per block in place when cuts move between rounds, so
    the cap is a mask over the full-rank matrices; ``state`` hands out, and ``load`` takes, the truncated
    matrices, so the wire carries only the real rank.
    """

    def __init__(self, peft_model: PeftModel):
        self.model = peft_model
        self.caps: dict[str, dict[int, int]] = {}
        self._by_layer: dict[int, list[BaseTunerLayer]] = defaultdict(list)
        for name, module in peft_model.named_modules():
            if isinstance(module, BaseTunerLayer):
                idx = layer_index(name)
                if idx is not None:
                    self._by_layer[idx].append(module)

    @property
    def names(self) -> list[str]:
        return list(self.model.peft_config)

    def add_copy(self, name: str, source: str = GLOBAL) -> None:
        """A new adapter starting from ``source``'s weights (FedAvg needs a common start)."""
        if name not in self.model.peft_config:
            self.model.add_adapter(name, self.model.peft_config[source])
        self.load(name, self.state(source))

    def activate(self, adapter: str, layers: Iterable[int]) -> None:
        """Run ``adapter`` on these blocks (and make its parameters there trainable)."""
        for idx in layers:
            for module in self._by_layer[idx]:
                if module.active_adapters != [adapter]:
                    module.set_adapter(adapter)

    def parameters(self, adapter: str, layers: Iterable[int]) -> list[torch.nn.Parameter]:
        keep = set(layers)
        return [p for n, p in self._named(adapter) if layer_index(n) in keep]

    def _named(self, adapter: str):
        token = f".{adapter}."
        for n, p in self.model.named_parameters():
            if "lora_" in n and token in n:
                yield n, p

    @staticmethod
    def canonical(name: str, adapter: str) -> str:
        return name.removeprefix(_PREFIX).replace(f".{adapter}.", ".")

    def cap_ranks(self, adapter: str, caps: dict[int, int]) -> None:
        """Cap the LoRA rank of some blocks of ``adapter`` (replacing earlier caps) and zero what is above."""
        self.caps[adapter] = dict(caps)
        self._mask(adapter)

    def _mask(self, adapter: str) -> None:
        caps = self.caps.get(adapter)
        if not caps:
            return
        with torch.no_grad():
            for n, p in self._named(adapter):
                cap, axis = caps.get(layer_index(n)), _rank_axis(n)
                if cap is not None and axis is not None and cap < p.shape[axis]:
                    p.narrow(axis, cap, p.shape[axis] - cap).zero_()

    def state(self, adapter: str, layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        """Detached copies of an adapter's LoRA matrices, optionally only for some blocks; capped blocks
        give only their ``cap`` rank components."""
        keep = None if layers is None else set(layers)
        full = {self.canonical(n, adapter): p.detach().clone() for n, p in self._named(adapter)
                if keep is None or layer_index(n) in keep}
        return truncate_ranks(full, self.caps.get(adapter, {}))

    def load(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        """Copy matrices in place (optimizers keep pointing at the same parameters). A matrix of lower
        rank than the parameter fills its first rank components; the rest, and anything above a cap,
        becomes zero."""
        params = {self.canonical(n, adapter): p for n, p in self._named(adapter)}
        unknown = set(state) - set(params)
        if unknown:
            raise KeyError(f"adapter {adapter!r} has no parameter(s) {sorted(unknown)[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                param, axis = params[key], _rank_axis(key)
                if param.shape == value.shape:
                    param.copy_(value)
                elif axis is not None and value.dim() == param.dim() and value.shape[axis] < param.shape[axis] \
                        and param.narrow(axis, 0, value.shape[axis]).shape == value.shape:
                    param.zero_()
                    param.narrow(axis, 0, value.shape[axis]).copy_(value)
                else:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(param.shape)}")
        self._mask(adapter)

    def num_bytes(self, adapter: str, layers: Iterable[int] | None = None) -> int:
        return sum(t.numel() * t.element_size() for t in self.state(adapter, layers).values())
