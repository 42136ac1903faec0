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


class AdapterBank:
    """Named adapters over one PEFT model, addressed by decoder block."""

    def __init__(self, peft_model: PeftModel):
        self.model = peft_model
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

    def state(self, adapter: str, layers: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        """Detached copies of an adapter's LoRA matrices, optionally only for some blocks."""
        keep = None if layers is None else set(layers)
        return {self.canonical(n, adapter): p.detach().clone() for n, p in self._named(adapter)
                if keep is None or layer_index(n) in keep}

    def load(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        """Copy matrices in place (optimizers keep pointing at the same parameters)."""
        params = {self.canonical(n, adapter): p for n, p in self._named(adapter)}
        unknown = set(state) - set(params)
        if unknown:
            raise KeyError(f"adapter {adapter!r} has no parameter(s) {sorted(unknown)[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                if params[key].shape != value.shape:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(params[key].shape)}")
                params[key].copy_(value)

    def num_bytes(self, adapter: str, layers: Iterable[int] | None = None) -> int:
        return sum(t.numel() * t.element_size() for t in self.state(adapter, layers).values())
