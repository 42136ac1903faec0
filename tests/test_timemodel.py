import pytest

from splitcom.errors import UserError
from splitcom.fleet.devices import DeviceProfile
from splitcom.fleet.timemodel import (
    ArchSpec,
    activation_bytes,
    arch_from_hf_config,
    client_flops,
    client_memory_bytes,
    compute_time,
    embed_flops,
    embed_params,
    layer_flops,
    layer_params,
    lm_head_flops,
    lora_params_per_layer,
    saved_activation_elems,
    server_flops,
    step_times,
    transfer_time,
)

# hidden 8, intermediate 16, 2 heads of 4, 1 kv head (q_dim 8, kv_dim 4), vocab 10, 4 layers, seq 4.
LLAMA = ArchSpec("llama", n_layers=4, hidden=8, intermediate=16, n_heads=2, n_kv_heads=1, vocab=10, seq_len=4)
GPT2 = ArchSpec("gpt2", n_layers=2, hidden=8, intermediate=32, n_heads=2, n_kv_heads=2, vocab=10, seq_len=4,
                n_positions=16)


def test_llama_layer_flops_by_hand():
    # Per token: q 2*8*8=128, k 2*8*4=64, v 64, o 128, gate/up/down 3*2*8*16=768 -> 1152 linear;
    # attention 2*2*S*q_dim = 4*4*8 = 128; LoRA r=2 on q (2*(8+8)=32 params) and v (2*(8+4)=24) -> 112.
    assert lora_params_per_layer(LLAMA, 2) == 56
    assert layer_flops(LLAMA, tokens=8) == (8 * (1152 + 128), 8 * (1152 + 2 * 128))
    assert layer_flops(LLAMA, tokens=8, lora_rank=2) == (8 * 1392, 8 * (1152 + 224 + 256))
    # Attention grows with the row length: S=8 doubles the 128.
    assert layer_flops(LLAMA, tokens=8, seq_len=8)[0] == 8 * (1152 + 256)


def test_gpt2_layer_flops_by_hand():
    # c_attn 2*8*24=384, c_proj 2*8*8=128, c_fc 2*8*32=512, mlp.c_proj 512 -> 1536; attention 128;
    # default LoRA target c_attn at r=2: 2*(8+24)=64 params -> 128 FLOPs.
    assert layer_flops(GPT2, tokens=4, lora_rank=2) == (4 * (1536 + 128 + 128), 4 * (1536 + 256 + 256))
    assert layer_params(GPT2) == 768 + 72 + 32  # weights + biases + 2 LayerNorms
    assert embed_params(GPT2) == (10 + 16) * 8


def test_head_tail_and_split_totals():
    assert embed_flops(LLAMA, 8) == (0.0, 0.0)
    assert lm_head_flops(LLAMA, 8) == (2 * 8 * 10 * 8, 2 * 8 * 10 * 8)
    assert client_flops(LLAMA, 1, 8, lora_rank=2) == (11136, 13056)
    assert server_flops(LLAMA, 1, 8, lora_rank=2) == (3 * 11136 + 1280, 3 * 13056 + 1280)
    for k in range(LLAMA.n_layers + 1):  # the cut moves work, it never creates or loses any
        c, s = client_flops(LLAMA, k, 8), server_flops(LLAMA, k, 8)
        assert c[0] + s[0] == server_flops(LLAMA, 0, 8)[0]
    with pytest.raises(UserError):
        client_flops(LLAMA, 5, 8)


def test_times_and_bytes():
    dev = DeviceProfile(name="d", flops=1e9, memory_bytes=1, uplink_bps=8e6, downlink_bps=16e6,
                        latency_s=0.01)
    assert compute_time(2e9, dev) == 2.0
    assert compute_time(2e9, 4e9) == 0.5
    assert transfer_time(1e6, 8e6, 0.01) == pytest.approx(1.01)  # 1 MB = 8 Mbit at 8 Mbit/s
    assert activation_bytes(LLAMA, 8, 0.5) == 32  # int4
    st = step_times(LLAMA, 1, dev, DeviceProfile(name="s", flops=1e12, memory_bytes=1, uplink_bps=1,
                                                  downlink_bps=1), tokens=8, lora_rank=2)
    assert st.client_fwd == pytest.approx(11136 / 1e9)
    assert st.upload == pytest.approx(0.01 + 8 * 8 * 8 * 4 / 8e6)
    assert st.download == pytest.approx(0.01 + 8 * 8 * 8 * 4 / 16e6)
    assert st.server == pytest.approx((3 * 11136 + 1280 + 3 * 13056 + 1280) / 1e12)
    assert st.client_bwd == pytest.approx(13056 / 1e9)
    assert st.total == pytest.approx(st.arrival + st.service + st.tail)


def test_memory_by_hand():
    # weights (80 embed + 592 per layer) * 4 B = 2688; activations (128 saved + 2*8 buffers) * 8 tok * 4 B
    # = 4608; LoRA 56 params * 16 B = 896.
    assert layer_params(LLAMA) == 576 + 16
    assert saved_activation_elems(LLAMA) == 4 * 8 + 2 * 8 + 2 * 4 + 4 * 16 + 2 * 4
    assert client_memory_bytes(LLAMA, 1, batch_tokens=8, lora_rank=2) == 8192
    per_block = 592 * 4 + 128 * 8 * 4 + 896
    assert client_memory_bytes(LLAMA, 2, 8, 2) - client_memory_bytes(LLAMA, 1, 8, 2) == per_block


def test_lora_targets():
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_params_per_layer(LLAMA, 2, attn) == 2 * (16 + 12 + 12 + 16)
    assert lora_params_per_layer(GPT2, 1, ["c_proj"]) == (8 + 8) + (32 + 8)  # attn.c_proj and mlp.c_proj
    with pytest.raises(UserError, match="q_proj") as ei:
        lora_params_per_layer(GPT2, 2, ["q_proj"])
    assert ei.value.where == "model.lora.target_modules"


def test_arch_validation():
    with pytest.raises(ValueError):
        ArchSpec("llama", 2, 10, 16, 3, 1, 10)
    with pytest.raises(ValueError):
        ArchSpec("bert", 2, 8, 16, 2, 2, 10)


# -- cross-checks against real models: torch's FLOP counter and autograd's saved tensors --------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=4, n_positions=64, vocab_size=50,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, attn_implementation="eager")
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                   tie_word_embeddings=True, attn_implementation="eager")
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_counts_match_torch(family):
    from torch.utils.flop_counter import FlopCounterMode

    model = _tiny(family)
    b, s, rank = 2, 6, 2
    arch = arch_from_hf_config(model.config, seq_len=s)
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    assert layer_params(arch) == sum(p.numel() for p in blocks[0].parameters())
    assert embed_params(arch) == sum(p.numel() for p in model.get_input_embeddings().parameters()) + (
        model.transformer.wpe.weight.numel() if family == "gpt2" else 0)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=4, fan_in_fan_out=family == "gpt2"))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == arch.n_layers * lora_params_per_layer(arch, rank)  # PEFT's default targets
    # The whole model fed a cut tensor that needs a gradient is the server at cut 0.
    x = torch.randn(b, s, arch.hidden, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        logits = pm(inputs_embeds=x).logits
    with FlopCounterMode(display=False) as bwd:
        logits.sum().backward()
    assert (fwd.get_total_flops(), bwd.get_total_flops()) == server_flops(arch, 0, b * s, s, rank)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_activations_within_band(family):
    model = _tiny(family)
    b, s = 2, 32
    arch = arch_from_hf_config(model.config, seq_len=s)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=family == "gpt2"))
    params = {p.untyped_storage().data_ptr() for p in pm.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(b, s, arch.hidden, requires_grad=True)
    inner = pm.base_model.model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if family == "gpt2":
            for blk in inner.transformer.h:
                x = blk(x)
        else:
            pe = inner.model.rotary_emb(x, torch.arange(s).unsqueeze(0))
            for blk in inner.model.layers:
                x = blk(x, position_embeddings=pe, attention_mask=None)
    est = arch.n_layers * saved_activation_elems(arch) * b * s * 4
    assert 0.7 <= sum(saved.values()) / est <= 1.1
