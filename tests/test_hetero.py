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


def test_client_stream_state_counts_against_its_device(tmp_path):
    """What a client keeps per training sample (DELTA mirror, prompt prefixes, summaries) grows with its data:
    the fleet's memory estimate includes it, as an upper bound of what a run measures; memory_fit leaves room
    for it; a device it does not fit is refused naming the client, device and the disk store, which fits."""
    from splitcom.compress.plan import state_bytes_per_sample, stream_plan
    from splitcom.fleet.fleet import Fleet

    T = "compression.temporal"
    cached = {f"{T}.enabled": True, f"{T}.refresh": "delta", f"{T}.threshold": 0.3, "compression.prefix": True,
              "compression.codec": "int8", "train.epochs": 2}
    cfg = tiny_cfg(**cached)
    s = prepare(cfg)
    hidden, seq = s.split.hidden_size, cfg.data.max_length
    per = state_bytes_per_sample(stream_plan(cfg, "client"), hidden, seq)
    assert per == 2 * seq * hidden * 4 + seq * 16 * 4 + seq * (16 * 4 + 8)  # mirror, prompt rows, summaries,
    # the prompts' summaries and tokens
    assert state_bytes_per_sample(stream_plan(tiny_cfg(), "client"), hidden, seq) == 0
    disk = tiny_cfg(**cached, **{f"{T}.store": "disk"})
    assert state_bytes_per_sample(stream_plan(disk, "client"), hidden, seq) == per - seq * hidden * 4
    ushape = tiny_cfg(**{"split.mode": "ushape", "split.tail_layers": 1, f"{T}.enabled": True,
                         f"{T}.streams": ["act_up", "act_down", "grad_up", "grad_down"]})
    # U-shape: summaries of act_up and grad_up, copies of the act_down and grad_down it receives
    assert state_bytes_per_sample(stream_plan(ushape, "client"), hidden, seq) == 2 * seq * 16 * 4 + 2 * seq * hidden * 4

    plain = run(tiny_cfg(**{"train.epochs": 2}), tmp_path / "plain", progress=False)
    got = run(cfg, tmp_path / "cached", progress=False)
    sizes = [len(p) for p in s.partitions]
    extra = [a - b for a, b in zip(got["client_memory_estimate_bytes"], plain["client_memory_estimate_bytes"],
                                   strict=True)]
    assert extra == [per * k for k in sizes]
    assert 0 < got["client_cache_bytes"] <= sum(extra)  # measured: the samples' real lengths, shared prompts

    fit = tiny_cfg(**cached, **{"split.cut_policy": "memory_fit", "federation.devices": [
        {"base": "laptop-cpu", "name": "small", "memory_bytes": max(got["client_memory_estimate_bytes"])}] * 3})
    deepest = Fleet(fit, s.split.lm.config)  # its deepest cut fills the device
    room = Fleet(fit, s.split.lm.config, [max(got["client_memory_estimate_bytes"]) // 3 // per] * 3)
    assert max(room.cuts) < max(deepest.cuts)  # the state took the room of deeper blocks
    phone = {"federation.devices": ["phone-midrange@lte"] * 3}
    many = [int(4 * 2**30 / per * 1.2)] * 3  # 1.2x the phone's 4 GiB
    with pytest.raises(UserError, match="client 0's device 'phone-midrange@lte'.*store: disk") as err:
        Fleet(tiny_cfg(**cached, **phone), s.split.lm.config, many)
    assert err.value.where == "federation.devices"
    Fleet(tiny_cfg(**cached, **phone, **{f"{T}.store": "disk"}), s.split.lm.config, many)  # mirror on flash: fits


def test_ushape_client_memory_counts_its_tail_head_and_logits():
    """A U-shape client holds its tail blocks, the LM head (unless tied) and the logits with their gradient
    beside its head blocks: the estimate counts them, and memory_fit leaves room for them."""
    from splitcom.fleet.fleet import Fleet

    s = prepare(tiny_cfg())
    lm = s.split.lm.config
    sfl, ushape = tiny_cfg(), tiny_cfg(**{"split.mode": "ushape", "split.tail_layers": 1})
    a, b = Fleet(sfl, lm).memory_estimates(), Fleet(ushape, lm).memory_estimates()
    logits = 2 * lm.vocab_size * sfl.train.batch_size * sfl.data.max_length * 4
    assert all(y - x > logits for x, y in zip(a, b, strict=True))  # the tail block too
    room = {"split.cut_policy": "memory_fit", "federation.devices": [
        {"base": "laptop-cpu", "name": "small", "memory_bytes": max(Fleet(tiny_cfg(**{
            "split.cut_policy": "memory_fit"}), lm).memory_estimates())}] * 3}
    deep, shallow = Fleet(tiny_cfg(**room), lm), Fleet(tiny_cfg(**room, **{"split.mode": "ushape",
                                                                            "split.tail_layers": 1}), lm)
    assert max(shallow.cuts) < max(deep.cuts)
    assert max(shallow.memory_estimates()) <= room["federation.devices"][0]["memory_bytes"]
