"""Splitting reproduces the unsplit model: logits and LoRA gradients within 1e-5."""

import pytest
import torch

from splitcom.models.adapters import GLOBAL, AdapterBank, attach_lora
from splitcom.models.load import load_model
from splitcom.models.split import SplitModel, causal_lm_loss, pad, unpad
from splitcom.protocol import serde
from splitcom.protocol.messages import SampleTensor, Stream, TensorMsg

FAMILIES = ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-mistral"]


def _batch(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), t), generator=g)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt: no loss on the first tokens
    return ids, mask, labels


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_unsplit_at_every_cut(name):
    model, tok = load_model(name)
    model.eval()
    split = SplitModel(model)
    lengths = [9, 14, 3, 14]
    ids, mask, _ = _batch(len(tok), lengths)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        for cut in range(1, split.num_layers):
            out = split.body(split.head(ids, lengths, cut), lengths, cut)
            for i, n in enumerate(lengths):  # real tokens only: padded positions are never sent
                torch.testing.assert_close(out[i, :n], ref[i, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_lora_gradients_match_through_the_wire(name):
    """Head -> serde (fp32, unpadded) -> body -> loss -> grad back through serde -> head backward."""
    model, tok = load_model(name)
    peft = attach_lora(model, rank=4, alpha=8, dropout=0.0)
    bank = AdapterBank(peft)
    with torch.no_grad():  # non-zero B so gradients reach A as well
        for p in bank.parameters(GLOBAL, range(4)):
            p.normal_(0, 0.02)
    split = SplitModel(peft)
    lengths = [11, 6, 8]
    ids, mask, labels = _batch(len(tok), lengths, seed=1)

    params = bank.parameters(GLOBAL, range(split.num_layers))
    loss_ref = causal_lm_loss(peft(input_ids=ids, attention_mask=mask).logits, labels)
    grads_ref = torch.autograd.grad(loss_ref, params)

    cut = 2
    h = split.head(ids, lengths, cut)
    wire = serde.encode(TensorMsg(Stream.act_up, 0, 0, "fp32", split.hidden_size,
                                  [SampleTensor(i, n, r.detach().numpy().tobytes())
                                   for i, (n, r) in enumerate(zip(lengths, unpad(h, lengths), strict=True))]))
    msg = serde.decode(wire)
    rows = [torch.frombuffer(bytearray(s.payload), dtype=torch.float32).reshape(s.length, -1) for s in msg.samples]
    h_server = pad(rows, h.shape[1]).requires_grad_(True)
    loss = causal_lm_loss(split.body(h_server, lengths, cut), labels)
    body_params = bank.parameters(GLOBAL, range(cut, split.num_layers))
    body_grads = torch.autograd.grad(loss, [h_server, *body_params])
    head_params = bank.parameters(GLOBAL, range(cut))
    head_grads = torch.autograd.grad(h, head_params, grad_outputs=body_grads[0])
    assert abs(loss.item() - loss_ref.item()) < 1e-5
    got = dict(zip([id(p) for p in head_params + body_params], list(head_grads) + list(body_grads[1:]), strict=True))
    for p, g_ref in zip(params, grads_ref, strict=True):
        torch.testing.assert_close(got[id(p)], g_ref, atol=1e-5, rtol=0)
