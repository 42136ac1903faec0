"""LoRA adapters via PEFT over one frozen base, with per-layer ownership.

PEFT injects LoRA once; ``default`` holds the aggregated global adapter, and every client gets a named
adapter (``c0``, ``c1``, ...) over the same frozen base weights: plain tensors of only the blocks its
owner runs, bound into PEFT's one ``slot`` adapter while they run. Each decoder block can run a
different adapter (client ``c3`` on the head blocks, ``shared`` on the server's blocks), which is how
one base serves every client without a model copy, and why a client costs its adapter and optimizer
state and nothing more.

Adapter state travels under *canonical* names: the PEFT parameter name without the wrapper prefix
and without the adapter name (``model.layers.3.self_attn.q_proj.lora_A.weight``), so the same key
means the same matrix on every side and in every process.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from splitcom.models.split import family_of, layer_index

GLOBAL = "default"  # the aggregated adapter: evaluated, exported, and the start of every client copy
SLOT = "slot"  # the one PEFT adapter that a lazy (per-client) adapter's tensors are bound into while it runs
_PREFIX = "base_model.model."


def attach_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float,
                target_modules: list[str] | None = None) -> PeftModel:
    targets = list(target_modules or family_of(model).lora_targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2")
    peft_model = get_peft_model(model, cfg, adapter_name=GLOBAL)
    return peft_model


def adapter_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over an owner's adapter matrices, made so that a client costs its adapter and optimizer state and
    nothing that grows with the number of clients besides:
    - its state is allocated now, next to the adapter, as AdamW's first step would (zero moments, step 0 on
      the CPU), not at the first step between one client's freed activations and the next's: allocated
      there, N clients' state fragments the heap and the process grows by far more than the state;
    - the gradients are dropped after each step instead of at the next one's ``zero_grad``, so a client
      holds no third adapter-sized buffer between its steps.
    Neither changes a result."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for p in params:  # AdamW._init_group's lazy state for a group that is neither fused nor capturable
        opt.state[p].update(step=torch.tensor(0.0, dtype=step_dtype),
                            exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                            exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
    opt.register_step_post_hook(lambda o, args, kwargs: o.zero_grad(set_to_none=True))
    return opt


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

    ``default`` (the global adapter) is a PEFT adapter over every block. A per-client adapter (``add_copy``)
    is *lazy* (DESIGN 4.2): it holds only the blocks someone asks for (``parameters``, ``activate``, ``load``,
    ``state`` with blocks), copied from the source adapter at that moment, each block as one flat leaf
    tensor outside the model (its matrices in model order; one tensor, not eight, because at a thousand
    clients every tensor's own overhead adds up). ``activate`` binds views of it into the one PEFT ``slot``
    adapter of those blocks, so a forward and backward run on, and the owner's optimizer steps, the owner's
    own tensor. A client holds the blocks it runs, the server those it runs for each client: per client,
    only its adapter and optimizer state, whatever the number of clients (the PEFT model keeps two
    adapters). A block once held stays held (a cut that moves back keeps it: at most the blocks between a
    client's cuts).

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
        self._lazy: dict[str, dict[int, torch.nn.Parameter]] = {}  # adapter -> block -> its flat tensor
        self._source: dict[str, str] = {}
        # per block, in model order: (canonical name, shape, slot module, attribute) of every matrix
        self._slot: dict[int, list[tuple[str, torch.Size, torch.nn.Module, str]]] = {}
        if SLOT in getattr(peft_model, "peft_config", {}):  # (a copy of a model that has one; a merged model has none)
            self._map_slot()

    @property
    def names(self) -> list[str]:
        return [n for n in getattr(self.model, "peft_config", {}) if n != SLOT] + list(self._lazy)

    def add_copy(self, name: str, source: str = GLOBAL) -> None:
        """A new (lazy) adapter starting from ``source``'s weights (FedAvg needs a common start); an existing
        one takes ``source``'s weights on the blocks it holds."""
        if source not in self.model.peft_config or name in self.model.peft_config:
            raise ValueError(f"a lazy adapter {name!r} copies a PEFT adapter (got source {source!r})")
        if SLOT not in self.model.peft_config:
            with torch.random.fork_rng(devices=[]):  # creating the slot consumes no randomness of the run
                self.model.add_adapter(SLOT, self.model.peft_config[GLOBAL])
            self._map_slot()
        self._source[name] = source
        held = self._lazy.setdefault(name, {})
        if held:
            self.load(name, self.state(source, held))

    def _map_slot(self) -> None:
        """Where each matrix of the slot lives; the slot's own weights are dropped: only bound views run."""
        for n, p in self._named(GLOBAL):
            owner, _, attr = n.rpartition(".")
            parent, _, adapter = owner.rpartition(".")
            if adapter != GLOBAL:
                raise NotImplementedError(f"lazy adapters cover LoRA matrices of linear layers, not {n}")
            module = self.model.get_submodule(f"{parent}.{SLOT}")
            module._parameters.pop(attr, None)
            module.__dict__.setdefault(attr, None)  # unbound: a forward through it fails loudly
            self._slot.setdefault(layer_index(n), []).append((self.canonical(n, GLOBAL), p.shape, module, attr))

    def copy_model(self) -> PeftModel:
        """A deep copy of the model (the per-client-copies baseline), without what is bound into the slot."""
        bound = [(module, attr, module.__dict__[attr]) for block in self._slot.values() for *_, module, attr in block]
        try:
            for module, attr, _ in bound:
                module.__dict__[attr] = None
            return copy.deepcopy(self.model)
        finally:
            for module, attr, t in bound:
                module.__dict__[attr] = t

    def _hold(self, adapter: str, layers: Iterable[int]) -> None:
        """Create a lazy adapter's tensors of these blocks (copies of its source) where it has none yet."""
        own = self._lazy[adapter]
        new = [idx for idx in sorted(set(layers)) if idx in self._slot and idx not in own]
        if not new:
            return
        src = dict(self._items(self._source[adapter], new))
        for idx in new:
            own[idx] = torch.nn.Parameter(torch.cat([src[key].detach().reshape(-1) for key, *_ in self._slot[idx]]))
        self._mask(adapter)

    def _views(self, flat: torch.Tensor, idx: int):
        """(canonical name, matrix) of one block's flat tensor: views, in model order."""
        block = self._slot[idx]
        pieces = flat.split([shape.numel() for _, shape, *_ in block])
        return ((key, piece.view(shape)) for (key, shape, *_), piece in zip(block, pieces, strict=True))

    def _items(self, adapter: str, layers: Iterable[int] | None = None):
        """(canonical name, tensor) of an adapter's matrices, optionally only some blocks, in model order: a
        PEFT adapter's parameters, or detached views of a lazy adapter's blocks (those it holds)."""
        keep = None if layers is None else set(layers)
        if adapter in self._lazy:
            for idx, flat in sorted(self._lazy[adapter].items()):
                if keep is None or idx in keep:
                    yield from self._views(flat.detach(), idx)
            return
        for n, p in self._named(adapter):
            if keep is None or layer_index(n) in keep:
                yield self.canonical(n, adapter), p

    def activate(self, adapter: str, layers: Iterable[int]) -> None:
        """Run ``adapter`` on these blocks (and make its parameters there trainable)."""
        layers = list(layers)
        if adapter in self._lazy:  # bind views of its tensors into the slot: gradients reach them
            self._hold(adapter, layers)
            own = self._lazy[adapter]
            for idx in layers:
                if idx in own:
                    for (_, _, module, attr), (_, view) in zip(self._slot[idx], self._views(own[idx], idx),
                                                               strict=True):
                        module.__dict__[attr] = view
            adapter = SLOT
        for idx in layers:
            for module in self._by_layer[idx]:
                if module.active_adapters != [adapter]:
                    module.set_adapter(adapter)

    def parameters(self, adapter: str, layers: Iterable[int]) -> list[torch.nn.Parameter]:
        """What an optimizer of these blocks steps: a PEFT adapter's matrices, or a lazy one's block tensors."""
        layers = sorted(set(layers))
        if adapter in self._lazy:
            self._hold(adapter, layers)
            return [self._lazy[adapter][idx] for idx in layers if idx in self._lazy[adapter]]
        return [p for _, p in self._items(adapter, layers)]

    def named(self, adapter: str, layers: Iterable[int]) -> dict[str, torch.Tensor]:
        """The live matrices of some blocks (full rank, capped components zero) by canonical name."""
        layers = list(layers)
        if adapter in self._lazy:
            self._hold(adapter, layers)
        return dict(self._items(adapter, layers))

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
            for n, p in self._items(adapter, caps):
                cap, axis = caps[layer_index(n)], _rank_axis(n)
                if axis is not None and cap < p.shape[axis]:
                    p.narrow(axis, cap, p.shape[axis] - cap).zero_()

    def state(self, adapter: str, layers: Iterable[int] | None = None, copy: bool = True) -> dict[str, torch.Tensor]:
        """An adapter's LoRA matrices, optionally only for some blocks; capped blocks give only their ``cap``
        rank components. Copies, unless ``copy=False``: then detached views of the live matrices, for a
        reader that is done with them before the next step (FedAvg, a checkpoint), so that N clients' worth
        of adapters is never held twice."""
        if layers is not None:
            layers = list(layers)
            if adapter in self._lazy:
                self._hold(adapter, layers)
        full = {k: p.detach().clone() if copy else p.detach() for k, p in self._items(adapter, layers)}
        return truncate_ranks(full, self.caps.get(adapter, {}))

    def load(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        """Copy matrices in place (optimizers keep pointing at the same parameters). A matrix of lower
        rank than the parameter fills its first rank components; the rest, and anything above a cap,
        becomes zero."""
        if adapter in self._lazy:
            self._hold(adapter, {i for i in map(layer_index, state) if i is not None})
        params = dict(self._items(adapter))
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
