"""Analytic FLOP, time and memory model of one split-LoRA training step.

Simulated runs on one CPU cannot time an edge fleet, so wall-clock figures come from counting
work and dividing by a device's sustained rate. Conventions, chosen so a reader can redo the sums:

* A multiply-add is 2 FLOPs; a ``(d_in -> d_out)`` linear costs ``2 * d_in * d_out`` per token.
* Attention scores ``Q K^T`` and ``P V`` cost ``2 * S * n_heads * head_dim`` each per token, over the
  full ``S x S`` square: eager and SDPA-math kernels compute the masked half too.
* Backward with frozen base weights computes activation gradients only: a frozen linear costs 1x
  its forward (``dX = dY W``; no ``dW``), attention 2x (gradients of both matmul operands), a LoRA
  adapter 2x its forward (``dX`` and ``dA``/``dB``). This is why LoRA backward is ~1x forward, not
  the 2x of full fine-tuning.
* Element-wise work (norms, activations, softmax, residuals, rotary, loss) is left out: it is
  memory-bound and a few percent of the matmuls at these sizes.
* Embedding lookup is a gather: 0 FLOPs. The LM head is frozen (tied to the embedding), so its
  backward is the input gradient only, 1x forward.

Units: FLOPs are plain counts, times are seconds, sizes are bytes, link rates bits per second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from splitcom.errors import UserError

Family = Literal["gpt2", "llama"]

# PEFT's defaults when `model.lora.target_modules` is None.
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}

# HF model_type -> family whose block shape it shares (gated-MLP decoders are "llama").
_FAMILIES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
             "gemma": "llama", "gemma2": "llama", "smollm3": "llama", "olmo": "llama", "granite": "llama"}


@dataclass(frozen=True)
class ArchSpec:
    """The few numbers of a decoder-only LM that decide its cost."""

    family: Family
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    seq_len: int = 128  # default training sequence length (tokens per sample)
    head_dim: int = 0  # 0: hidden // n_heads
    n_positions: int = 0  # learned position table rows (GPT-2); 0 for rotary models

    def __post_init__(self) -> None:
        if self.family not in DEFAULT_LORA_TARGETS:
            raise ValueError(f"family must be gpt2 or llama, got {self.family!r}")
        if self.head_dim == 0:
            if self.hidden % self.n_heads:
                raise ValueError("hidden must be a multiple of n_heads (or give head_dim)")
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.family == "gpt2" and self.n_kv_heads != self.n_heads:
            raise ValueError("gpt2 has no grouped-query attention")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def arch_from_hf_config(config: Any, seq_len: int = 128) -> ArchSpec:
    """ArchSpec of a transformers ``PretrainedConfig`` (GPT-2 or a Llama-like decoder)."""
    mt = getattr(config, "model_type", None)
    family = _FAMILIES.get(mt or "")
    if family is None:
        raise UserError(f"no time model for model_type {mt!r}; known: {', '.join(sorted(_FAMILIES))}",
                        where="model.name")
    if family == "gpt2":
        h = config.n_embd
        return ArchSpec("gpt2", config.n_layer, h, config.n_inner or 4 * h, config.n_head, config.n_head,
                        config.vocab_size, seq_len, n_positions=config.n_positions)
    n_heads = config.num_attention_heads
    return ArchSpec("llama", config.num_hidden_layers, config.hidden_size, config.intermediate_size, n_heads,
                    getattr(config, "num_key_value_heads", None) or n_heads, config.vocab_size, seq_len,
                    head_dim=getattr(config, "head_dim", None) or 0)


def linear_shapes(arch: ArchSpec) -> dict[str, tuple[int, int]]:
    """``(d_in, d_out)`` of every linear in one decoder block, keyed by its HF module path."""
    h, inter = arch.hidden, arch.intermediate
    if arch.family == "gpt2":
        return {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h),
                "mlp.c_fc": (h, inter), "mlp.c_proj": (inter, h)}
    return {"self_attn.q_proj": (h, arch.q_dim), "self_attn.k_proj": (h, arch.kv_dim),
            "self_attn.v_proj": (h, arch.kv_dim), "self_attn.o_proj": (arch.q_dim, h),
            "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter), "mlp.down_proj": (inter, h)}


def lora_shapes(arch: ArchSpec, targets: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """Shapes of the adapted linears; a target matches a module path equal to it or ending in it (as PEFT)."""
    names = tuple(targets) if targets is not None else DEFAULT_LORA_TARGETS[arch.family]
    shapes = linear_shapes(arch)
    bad = [t for t in names if not any(k == t or k.endswith("." + t) for k in shapes)]
    if bad:
        known = sorted({k.rsplit(".", 1)[-1] for k in shapes})
        raise UserError(f"LoRA targets {bad} match no {arch.family} module; known: {', '.join(known)}",
                        where="model.lora.target_modules")
    return [s for k, s in shapes.items() if any(k == t or k.endswith("." + t) for t in names)]


def lora_params_per_layer(arch: ArchSpec, rank: int, targets: Sequence[str] | None = None) -> int:
    return sum(rank * (i + o) for i, o in lora_shapes(arch, targets)) if rank else 0


def layer_params(arch: ArchSpec) -> int:
    """Frozen parameters of one block: linears, biases (GPT-2) and norm weights."""
    shapes = linear_shapes(arch).values()
    weights = sum(i * o for i, o in shapes)
    if arch.family == "gpt2":
        return weights + sum(o for _, o in shapes) + 4 * arch.hidden  # biases + 2 LayerNorms (w, b)
    return weights + 2 * arch.hidden  # 2 RMSNorm weights


def embed_params(arch: ArchSpec) -> int:
    return (arch.vocab + arch.n_positions) * arch.hidden


def layer_flops(arch: ArchSpec, tokens: int, seq_len: int | None = None, lora_rank: int = 0,
                lora_targets: Sequence[str] | None = None) -> tuple[float, float]:
    """(forward, backward) FLOPs of one decoder block over ``tokens`` tokens of ``seq_len``-long rows."""
    s = arch.seq_len if seq_len is None else seq_len
    lin = sum(2 * i * o for i, o in linear_shapes(arch).values())
    lora = 2 * lora_params_per_layer(arch, lora_rank, lora_targets)  # 2 FLOPs per adapter weight
    attn = 2 * 2 * s * arch.q_dim  # QK^T + PV, per token
    fwd = tokens * (lin + lora + attn)
    bwd = tokens * (lin + 2 * lora + 2 * attn)
    return float(fwd), float(bwd)


def embed_flops(arch: ArchSpec, tokens: int) -> tuple[float, float]:
    """Embeddings are a table lookup (and GPT-2's position add, element-wise): no matmul FLOPs."""
    return 0.0, 0.0


def lm_head_flops(arch: ArchSpec, tokens: int) -> tuple[float, float]:
    """(forward, backward) of the frozen LM head; loss and final norm are element-wise, left out."""
    f = 2.0 * arch.hidden * arch.vocab * tokens
    return f, f


def _check_cut(arch: ArchSpec, k: int) -> None:
    if not 0 <= k <= arch.n_layers:
        raise UserError(f"cut {k} outside [0, {arch.n_layers}]", where="split.cut_layer")


def client_flops(arch: ArchSpec, k: int, tokens: int, seq_len: int | None = None, lora_rank: int = 0,
                 lora_targets: Sequence[str] | None = None) -> tuple[float, float]:
    """(forward, backward) on the client: embeddings + blocks [0, k).

    Block 0's input gradient is counted although nothing needs it (embeddings are frozen): a
    slight overestimate, kept so every block costs the same.
    """
    _check_cut(arch, k)
    lf, lb = layer_flops(arch, tokens, seq_len, lora_rank, lora_targets)
    ef, eb = embed_flops(arch, tokens)
    return ef + k * lf, eb + k * lb


def server_flops(arch: ArchSpec, k: int, tokens: int, seq_len: int | None = None, lora_rank: int = 0,
                 lora_targets: Sequence[str] | None = None) -> tuple[float, float]:
    """(forward, backward) on the server: blocks [k, L) + LM head, including the cut gradient."""
    _check_cut(arch, k)
    lf, lb = layer_flops(arch, tokens, seq_len, lora_rank, lora_targets)
    hf, hb = lm_head_flops(arch, tokens)
    n = arch.n_layers - k
    return n * lf + hf, n * lb + hb


def compute_time(flops: float, device: Any) -> float:
    """Seconds for ``flops`` on ``device`` (anything with ``.flops`` in FLOP/s, or a FLOP/s number)."""
    rate = float(getattr(device, "flops", device))
    if rate <= 0:
        raise ValueError("device FLOP/s must be positive")
    return flops / rate


def transfer_time(nbytes: float, bps: float, latency: float = 0.0) -> float:
    """Seconds to move ``nbytes`` bytes over a ``bps`` bits/s link with one-way ``latency`` seconds."""
    if bps <= 0:
        raise ValueError("link rate must be positive")
    return latency + 8.0 * nbytes / bps


def activation_bytes(arch: ArchSpec, tokens: int, bytes_per_elem: float = 4.0) -> float:
    """Bytes of the cut tensor (or its gradient): ``tokens x hidden`` elements (int4 = 0.5 B/elem)."""
    return tokens * arch.hidden * bytes_per_elem


@dataclass(frozen=True)
class StepTimes:
    """Seconds of each phase of one client's step; ``arrival/service/tail`` feed the scheduler."""

    client_fwd: float
    upload: float
    server: float
    download: float
    client_bwd: float

    @property
    def arrival(self) -> float:  # when the request reaches the server, from step start
        return self.client_fwd + self.upload

    @property
    def service(self) -> float:  # server forward + backward
        return self.server

    @property
    def tail(self) -> float:  # after service: gradient download + client backward
        return self.download + self.client_bwd

    @property
    def total(self) -> float:  # uncontended step time (the server serving nobody else)
        return self.arrival + self.service + self.tail


def step_times(arch: ArchSpec, k: int, client: Any, server: Any, tokens: int, seq_len: int | None = None,
               lora_rank: int = 0, lora_targets: Sequence[str] | None = None, act_bytes: float = 4.0,
               grad_bytes: float = 4.0, extra_up_bytes: float = 0.0) -> StepTimes:
    """Phase times of one step at cut ``k``; only the client's link counts (the server's is fatter).

    ``act_bytes``/``grad_bytes`` are wire bytes per element after the codec; ``extra_up_bytes``
    covers labels and masks if the wire format sends them with the activations.
    """
    cf, cb = client_flops(arch, k, tokens, seq_len, lora_rank, lora_targets)
    sf, sb = server_flops(arch, k, tokens, seq_len, lora_rank, lora_targets)
    up = activation_bytes(arch, tokens, act_bytes) + extra_up_bytes
    down = activation_bytes(arch, tokens, grad_bytes)
    return StepTimes(client_fwd=compute_time(cf, client),
                     upload=transfer_time(up, client.uplink_bps, client.latency_s),
                     server=compute_time(sf + sb, server),
                     download=transfer_time(down, client.downlink_bps, client.latency_s),
                     client_bwd=compute_time(cb, client))


def saved_activation_elems(arch: ArchSpec, seq_len: int | None = None) -> int:
    """Elements one block keeps per token for backward (eager attention, dropout off).

    GPT-2: ln1 in/out, q/k/v, attention context, ln2 in/out (8h) + four I-sized tensors of the
    tanh GELU (its input, tanh, 1 + tanh, x/2). Llama: norm1 in/out, norm2 in/out (4h), q and
    context (2 q_dim), k and v (2 kv_dim), gate, up, SiLU(gate) and their product (4I). Both add
    the softmax output, ``n_heads x S``, which flash/memory-efficient attention would not keep.
    Autograd skips inputs of frozen, unadapted linears, so this over-counts some tensors and
    misses others (eager GQA materialises repeated k/v); on tiny models it over-estimates what
    autograd saves by 5-20%, the safe side for a memory fit (tests/test_timemodel.py checks a band).
    """
    s = arch.seq_len if seq_len is None else seq_len
    probs = arch.n_heads * s
    h, inter = arch.hidden, arch.intermediate
    if arch.family == "gpt2":
        return 8 * h + 4 * inter + probs
    return 4 * h + 2 * arch.q_dim + 2 * arch.kv_dim + 4 * inter + probs


def client_memory_bytes(arch: ArchSpec, k: int, batch_tokens: int, lora_rank: int = 0,
                        lora_targets: Sequence[str] | None = None, seq_len: int | None = None,
                        weight_bytes: float = 4.0, act_bytes: float = 4.0,
                        lora_state_bytes: float = 16.0) -> float:
    """Peak bytes on a client holding embeddings + blocks [0, k), for choosing the cut.

    Sums frozen weights (embedding table, GPT-2 position table, k blocks), activations saved for
    backward (``saved_activation_elems`` per token per block) plus two cut-sized buffers (the sent
    activations, the received gradient), and LoRA state: ``lora_state_bytes`` per adapter parameter,
    16 = fp32 weight + grad + Adam m and v. Framework overhead and allocator slack are not modelled:
    the device's ``memory_bytes`` is already the budget after those.
    """
    _check_cut(arch, k)
    weights = (embed_params(arch) + k * layer_params(arch)) * weight_bytes
    acts = (k * saved_activation_elems(arch, seq_len) + 2 * arch.hidden) * batch_tokens * act_bytes
    lora = k * lora_params_per_layer(arch, lora_rank, lora_targets) * lora_state_bytes
    return float(weights + acts + lora)
