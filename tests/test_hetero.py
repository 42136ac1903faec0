"""Per-client cuts, handover, one base vs copies, simulated time and schedules in the rounds loop."""

import pytest
import torch
from conftest import tiny_cfg, train_round

from splitcom.errors import UserError
from splitcom.federation.aggregate import fedavg
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.models.adapters import GLOBAL
from splitcom.transport.counters import ByteCounter


def test_heterogeneous_cuts_aggregate_per_layer_by_hand():
    """Per-layer FedAvg over clients with cuts 1, 2, 3: every layer averages all clients' copies,
    wherever they live (client for l < k_i, server for l >= k_i), weighted by sample counts."""
    cfg = tiny_cfg(**{"federation.num_clients": 3})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter(), cuts={0: 1, 1: 2, 2: 3})
    train_round(clients)
    weights = [float(c.num_samples) for c in clients]
    states = [s.bank.state(f"c{c.cid}") for c in clients]  # head (client) + body (server) of each client
    expected = fedavg(list(zip(weights, states, strict=True)))
    server.aggregate()
    got = s.bank.state(GLOBAL)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)


def test_handover_keeps_the_global_adapter():
    cfg = tiny_cfg(**{"federation.num_clients": 2})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter(), cuts={0: 1, 1: 3})
    train_round(clients)
    server.aggregate()
    for c in clients:
        c.pull_adapters(0)
    before = s.bank.state(GLOBAL)
    server.set_cut(0, 3)
    clients[0].set_cut(3)
    clients[0].pull_adapters(1)
    server.set_cut(1, 1)
    clients[1].set_cut(1)
    clients[1].pull_adapters(1)
    after = s.bank.state(GLOBAL)
    assert all(torch.equal(before[k], after[k]) for k in before)
    for c in clients:  # both sides of every client now start from the global adapter
        own = s.bank.state(c.adapter)
        for k, v in own.items():
            assert torch.equal(v, before[k]), k
    # and training goes on with the new cuts
    train_round(clients)
    assert set(server.aggregate()) == set(before)


def test_shared_base_is_much_smaller_than_copies(tmp_path):
    one = run(tiny_cfg(**{"train.epochs": 1, "federation.num_clients": 4}), tmp_path / "a", progress=False)
    copies = run(tiny_cfg(**{"train.epochs": 1, "federation.num_clients": 4,
                             "federation.server_adapters": "per_client_copies"}), tmp_path / "b", progress=False)
    # four copies of a tiny base whose adapters are large next to it: about 3.3x here
    assert copies["server_state"]["parameters"] > 3 * one["server_state"]["parameters"]
    assert one["server_state_bytes"] < 0.4 * copies["server_state_bytes"]
    # the baseline trains the same way: same data order, same model, same result
    assert abs(one["val_loss"] - copies["val_loss"]) < 1e-5


def test_simulated_time_and_schedules(tmp_path):
    res = {}
    for policy in ("round_robin", "fifo", "longest_tail_first", "exact"):
        res[policy] = run(tiny_cfg(**{"federation.devices": "mixed10", "federation.num_clients": 4,
                                      "federation.schedule": policy, "train.epochs": 1}),
                          tmp_path / policy, progress=False)
    for s in res.values():
        assert s["simulated_s"] > 0 and s["simulated_s_by_epoch"] and s["makespan_per_step_s"] > 0
    assert res["exact"]["simulated_s"] <= min(r["simulated_s"] for r in res.values()) + 1e-9
    assert res["longest_tail_first"]["simulated_s"] <= res["fifo"]["simulated_s"] + 1e-9
    # the schedule orders service in simulated time only: training itself is unchanged
    assert len({round(r["val_loss"], 10) for r in res.values()}) == 1


def test_memory_fit_and_adaptive_cuts(tmp_path):
    fit = run(tiny_cfg(**{"split.cut_policy": "memory_fit", "train.epochs": 1}), tmp_path / "fit", progress=False)
    assert fit["cuts"] == [3, 3, 3]  # tiny model: every device holds all but the server's last block
    ad = run(tiny_cfg(**{"split.cut_policy": "adaptive", "train.epochs": 3, "federation.num_clients": 4}),
             tmp_path / "ad", progress=False)
    assert ad["cuts_by_round"][0] == [2, 2, 2, 2] and len(ad["cuts_by_round"]) == 4
    assert any(r != ad["cuts_by_round"][0] for r in ad["cuts_by_round"][1:])
    assert all(1 <= k <= 3 for r in ad["cuts_by_round"] for k in r)


def test_device_too_small_names_device_and_memory(tmp_path):
    cfg = tiny_cfg(**{"split.cut_policy": "memory_fit",
                      "federation.devices": "[{base: raspberry-pi-5, memory_bytes: 1000}]"})
    with pytest.raises(UserError) as e:
        run(cfg, tmp_path, progress=False)
    assert "raspberry-pi-5" in str(e.value) and "GiB" in str(e.value)


def test_unknown_fleet_lists_known(tmp_path):
    with pytest.raises(UserError, match="federation.devices") as e:
        run(tiny_cfg(**{"federation.devices": "nosuchfleet"}), tmp_path, progress=False)
    assert "mixed10" in str(e.value)
