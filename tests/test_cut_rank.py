"""Cut-layer rank (DESIGN 4.7): the blocks next to each client's cut train a smaller LoRA rank, the wire
carries only that rank, and FedAvg zero-pads across ranks."""

import math

import pytest
import torch
from conftest import tiny_cfg, train_round

from splitcom.errors import UserError
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.models.adapters import GLOBAL, rank_caps
from splitcom.protocol.messages import Stream
from splitcom.transport.counters import ByteCounter

RANK, CUT_RANK = 8, 2


def test_rank_caps_are_the_blocks_next_to_each_cut():
    assert rank_caps(None, 2) == {}
    assert rank_caps(2, 2) == {1: 2, 2: 2}
    assert rank_caps(3, 1, tail_start=3) == {0: 3, 1: 3, 2: 3, 3: 3}  # U-shape: both cuts


def test_different_cuts_and_ranks_aggregate_zero_padded_by_hand():
    """Client 0 cuts at 1 (rank 2 at blocks 0, 1), client 1 at 2 (rank 2 at blocks 1, 2): block 0 mixes a
    rank-2 and a rank-8 copy, block 2 a rank-8 and a rank-2 copy. The global adapter is the weighted mean of
    the zero-padded copies, and each side gets back its own rank."""
    s = prepare(tiny_cfg(**{"federation.num_clients": 2, "model.lora.cut_rank": CUT_RANK}))
    server, clients = build_sfl(s, ByteCounter(), cuts={0: 1, 1: 2})
    train_round(clients)
    w0, w1 = (float(c.num_samples) for c in clients)
    key = "model.layers.{}.self_attn.q_proj.lora_{}.weight"
    up0, up1 = server.uploads[0].tensors, server.uploads[1].tensors
    assert up0[key.format(0, "A")].shape[0] == CUT_RANK and up1[key.format(0, "A")].shape[0] == RANK
    assert up1[key.format(1, "B")].shape[1] == CUT_RANK  # client 1's last block
    a0, a1 = up0[key.format(0, "A")], up1[key.format(0, "A")]
    srv = {cid: s.bank.state(f"c{cid}", [2]) for cid in (0, 1)}  # block 2 lives on the server for both
    b0, b1 = srv[0][key.format(2, "B")], srv[1][key.format(2, "B")]
    assert b0.shape[1] == RANK and b1.shape[1] == CUT_RANK
    server.aggregate()
    got = s.bank.state(GLOBAL)
    want_a = torch.zeros(RANK, a1.shape[1])
    want_a[:CUT_RANK] = (w0 * a0 + w1 * a1[:CUT_RANK]) / (w0 + w1)
    want_a[CUT_RANK:] = w1 * a1[CUT_RANK:] / (w0 + w1)
    torch.testing.assert_close(got[key.format(0, "A")], want_a, atol=1e-6, rtol=0)
    want_b = w0 * b0 / (w0 + w1)
    want_b[:, :CUT_RANK] += w1 * b1 / (w0 + w1)
    torch.testing.assert_close(got[key.format(2, "B")], want_b, atol=1e-6, rtol=0)
    # redistribution truncates to each client's rank; everything above the cap is exactly zero
    for c in clients:
        c.pull_adapters(0)
    own0 = s.bank.state("c0", [0])[key.format(0, "A")]
    assert own0.shape[0] == CUT_RANK and torch.equal(own0, got[key.format(0, "A")][:CUT_RANK])
    full = s.bank.named("c0", [0])  # the live full-rank matrix: zero above the cap
    assert not full[key.format(0, "A")][CUT_RANK:].any()


def test_capped_blocks_stay_low_rank_and_move_with_the_cut():
    s = prepare(tiny_cfg(**{"federation.num_clients": 2, "model.lora.cut_rank": CUT_RANK, "train.lr": 0.05}))
    server, clients = build_sfl(s, ByteCounter(), cuts={0: 2, 1: 2})
    for _ in range(2):
        train_round(clients)
    params = s.bank.named("c0", range(4))  # client 0's head blocks and the server's blocks for it
    for block in (0, 1, 2, 3):
        a = params[f"model.layers.{block}.self_attn.v_proj.lora_A.weight"]
        b = params[f"model.layers.{block}.self_attn.v_proj.lora_B.weight"]
        rank = torch.linalg.matrix_rank(b.detach().double() @ a.detach().double()).item()
        assert rank <= CUT_RANK if block in (1, 2) else rank > CUT_RANK, (block, rank)
    server.aggregate()
    for c in clients:
        c.pull_adapters(0)
    server.set_cut(0, 3)  # a handover: blocks 2, 3 are now next to client 0's cut, block 1 is not
    clients[0].set_cut(3)
    clients[0].pull_adapters(1)
    glob, own = s.bank.state(GLOBAL), s.bank.state("c0")
    for name, v in own.items():
        layer = int(name.split(".")[2])
        expect = glob[name]
        if layer in (2, 3):
            expect = expect[:CUT_RANK] if ".lora_A." in name else expect[:, :CUT_RANK]
        assert torch.equal(v, expect), name
    train_round(clients)  # and training goes on


def test_cut_rank_shrinks_adapter_bytes_exactly(tmp_path):
    over = {"train.epochs": 1, "federation.num_clients": 3}
    full = run(tiny_cfg(**over), tmp_path / "full", progress=False)
    low = run(tiny_cfg(**over, **{"model.lora.cut_rank": CUT_RANK}), tmp_path / "low", progress=False)
    s = prepare(tiny_cfg(**over))
    block1 = s.bank.state(GLOBAL, [1])  # the client's capped block (cut 2); block 2 stays on the server
    saved = sum(t.numel() * (RANK - CUT_RANK) // RANK * 4 for t in block1.values())
    for stream in (Stream.adapters_up, Stream.adapters_down):
        diff = full["bytes_by_stream"][stream.name] - low["bytes_by_stream"][stream.name]
        assert diff == 3 * saved, stream  # 3 clients, 1 round
    assert low["bytes_by_stream"]["act_up"] == full["bytes_by_stream"]["act_up"]
    assert math.isfinite(low["val_loss"])


def test_bad_cut_rank(tmp_path):
    with pytest.raises(UserError, match="model.lora.cut_rank"):
        tiny_cfg(**{"model.lora.cut_rank": RANK + 1})
    with pytest.raises(UserError, match="model.lora.cut_rank, federation.server_adapters"):
        run(tiny_cfg(**{"model.lora.cut_rank": 2, "federation.server_adapters": "shared"}), tmp_path,
            progress=False)
