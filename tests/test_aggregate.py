import pytest
import torch

from splitcom.federation.aggregate import fedavg, split_by_layer


def test_weighted_mean_by_hand():
    a = {"model.layers.0.q.lora_A.weight": torch.tensor([[1.0, 2.0]])}
    b = {"model.layers.0.q.lora_A.weight": torch.tensor([[3.0, 6.0]])}
    out = fedavg([(1.0, a), (3.0, b)])
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5
    assert torch.equal(out["model.layers.0.q.lora_A.weight"], torch.tensor([[2.5, 5.0]]))


def test_per_layer_over_heterogeneous_holders():
    # client 0 holds layers 0-1, client 1 holds layer 0 only (its layer 1 lives elsewhere / absent)
    k0, k1 = "model.layers.0.x", "model.layers.1.x"
    out = fedavg([(2.0, {k0: torch.tensor([4.0]), k1: torch.tensor([10.0])}),
                  (2.0, {k0: torch.tensor([0.0])})])
    assert out[k0].item() == 2.0
    assert out[k1].item() == 10.0  # only one holder: unchanged


def test_rank_mismatch_zero_pads_to_largest():
    a = {"l.lora_A": torch.ones(2, 3), "l.lora_B": torch.ones(4, 2)}  # rank 2
    b = {"l.lora_A": torch.full((4, 3), 3.0), "l.lora_B": torch.full((4, 4), 3.0)}  # rank 4
    out = fedavg([(1.0, a), (1.0, b)])
    assert out["l.lora_A"].shape == (4, 3) and out["l.lora_B"].shape == (4, 4)
    assert torch.equal(out["l.lora_A"][:2], torch.full((2, 3), 2.0))
    assert torch.equal(out["l.lora_A"][2:], torch.full((2, 3), 1.5))
    assert torch.equal(out["l.lora_B"][:, 2:], torch.full((4, 2), 1.5))


def test_bad_weights():
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError):
        fedavg([(0.0, {"a": torch.ones(1)})])


def test_split_by_layer():
    s = {"model.layers.0.a": 1, "model.layers.3.a": 2, "transformer.h.1.b": 3, "lm_head.w": 4}
    assert split_by_layer(s, {0, 1}) == {"model.layers.0.a": 1, "transformer.h.1.b": 3}
