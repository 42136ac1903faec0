"""Federated LoRA (federation.mode=fl): the whole model on every device, adapters alone on the wire."""

import pytest
import torch
from conftest import tiny_cfg

from splitcom.errors import UserError
from splitcom.federation.centralized import CentralizedTrainer
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.fleet.devices import resolve_devices
from splitcom.fleet.timemodel import (
    arch_from_hf_config,
    compute_time,
    full_model_memory_bytes,
    layer_flops,
    lm_head_flops,
    transfer_time,
)
from splitcom.models.adapters import GLOBAL
from splitcom.protocol import serde
from splitcom.protocol.messages import AdapterMsg, Stream
from splitcom.transport.counters import ByteCounter

FL = {"federation.mode": "fl"}


def test_one_client_fl_equals_centralized():
    """One FL client is the centralized PEFT training, bit for bit: same step code on its own adapter."""
    cfg = tiny_cfg(**FL, **{"federation.num_clients": 1})
    a = prepare(cfg)
    server, (client,) = build_sfl(a, ByteCounter())
    assert client.cut == a.split.num_layers and not server.optimizers  # the server trains nothing
    b = prepare(cfg)
    central = CentralizedTrainer(b.split.model, b.bank, b.train, lr=cfg.train.lr, batch_size=cfg.train.batch_size,
                                 pad_id=b.pad_id)
    for step, batch in enumerate(client.epoch_batches(1)[:4]):
        assert client.train_step(batch, step) == central.train_step(batch, step)
    got, ref = a.bank.state("c0", range(a.split.num_layers)), b.bank.state(GLOBAL)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert client.channel.take_bytes() == (0, 0)  # no step traffic (nothing joined either: build_sfl only)


def test_fedavg_of_two_fl_clients_is_the_weighted_mean():
    cfg = tiny_cfg(**FL, **{"federation.num_clients": 2})
    s = prepare(cfg)
    s.partitions = [s.partitions[0][:5], s.partitions[0][5:] + s.partitions[1]]  # unequal weights
    counter = ByteCounter()
    server, clients = build_sfl(s, counter)
    for c in clients:
        c.train_step(c.epoch_batches(1)[0], 0)
    mine = [s.bank.state(c.adapter, c.layers) for c in clients]
    assert not torch.equal(*(m["model.layers.0.self_attn.q_proj.lora_B.weight"] for m in mine))  # (B starts at 0)
    for c in clients:
        c.push_adapters(0)
    server.aggregate()
    w = [len(p) for p in s.partitions]
    assert w[0] != w[1]
    glob = s.bank.state(GLOBAL)
    assert glob.keys() == mine[0].keys()
    for k in glob:
        torch.testing.assert_close(glob[k], (w[0] * mine[0][k] + w[1] * mine[1][k]) / (w[0] + w[1]),
                                   rtol=0, atol=1e-7)
    for c in clients:  # the download is the average, on every block
        c.pull_adapters(0)
        assert all(torch.equal(t, glob[k]) for k, t in s.bank.state(c.adapter, c.layers).items())


def test_fl_bytes_are_the_adapter_messages(tmp_path):
    """Only adapters (and control) travel; each direction carries one whole fp32 adapter per client per round."""
    cfg = tiny_cfg(**FL, **{"train.epochs": 2})
    summary = run(cfg, tmp_path, progress=False)
    s = prepare(cfg)
    glob = s.bank.state(GLOBAL)
    n, rounds = cfg.federation.num_clients, summary["rounds"]
    up = sum(len(serde.encode(AdapterMsg(Stream.adapters_up, cid, r, float(len(s.partitions[cid])), glob,
                                         s.split.num_layers))) for cid in range(n) for r in range(rounds))
    down = sum(len(serde.encode(AdapterMsg(Stream.adapters_down, cid, r, 0.0, glob, s.split.num_layers)))
               for cid in range(n) for r in range(rounds))
    by = summary["bytes_by_stream"]
    assert set(by) == {"adapters_up", "adapters_down", "control"}
    assert by["adapters_up"] == up and by["adapters_down"] == down
    assert summary["val_loss"] < summary["initial_val_loss"]



@pytest.mark.parametrize("key,value", [
    ("split.mode", "ushape"), ("split.tail_layers", 2), ("split.cut_policy", "memory_fit"), ("split.cut_layer", 3),
    ("model.lora.cut_rank", 2), ("compression.temporal.enabled", True), ("compression.temporal.threshold", 0.9),
    ("compression.codec", "int8"), ("compression.grad_codec", "int4"), ("compression.prefix", True),
    ("federation.server_adapters", "shared"), ("federation.schedule", "fifo"), ("privacy.noise", 0.3),
])
def test_split_only_keys_are_refused_in_fl(key, value):
    with pytest.raises(UserError) as err:
        tiny_cfg(**FL, **{key: value})
    assert err.value.where == key and "federation.mode=fl" in str(err.value)
    tiny_cfg(**{key: value})  # (fine for a split)


def test_fl_keeps_the_keys_it_uses():
    cfg = tiny_cfg(**FL, **{"compression.adapter_codec": "int8", "compression.adapter_refresh": "delta",
                            "compression.entropy": "zstd", "federation.devices": "mixed10",
                            "federation.aggregate_every": 2})
    assert cfg.federation.mode == "fl"


def test_a_device_too_small_for_the_whole_model_is_refused(tmp_path):
    """Client 1's device holds SFL's two blocks but not the whole model: exit 2 naming the client and device."""
    cfg = tiny_cfg(**FL)
    s = prepare(cfg)
    arch = arch_from_hf_config(s.split.lm.config, seq_len=cfg.data.max_length)
    tokens = cfg.train.batch_size * cfg.data.max_length
    need = full_model_memory_bytes(arch, tokens, cfg.model.lora.rank, s.split.family.lora_targets,
                                   tied_head=bool(s.split.lm.config.tie_word_embeddings))
    small = {"base": "raspberry-pi-5", "name": "tiny-box", "memory_bytes": int(need * 0.9)}
    devices = ["laptop-cpu", small]
    sfl = run(tiny_cfg(**{"federation.devices": devices, "train.epochs": 1}), tmp_path / "sfl", progress=False)
    assert sfl["client_memory_estimate_bytes"][1] < small["memory_bytes"]  # the split fits
    with pytest.raises(UserError, match="client 1's device 'tiny-box'") as err:
        run(tiny_cfg(**FL, **{"federation.devices": devices}), tmp_path / "fl", progress=False)
    assert err.value.where == "federation.devices"
    big = run(tiny_cfg(**FL, **{"federation.devices": ["laptop-cpu", {**small, "memory_bytes": int(need)}],
                                "train.epochs": 1}), tmp_path / "fits", progress=False)
    assert big["client_memory_estimate_bytes"] == [int(need)] * 3


def test_fl_round_time_is_the_slowest_device_training_plus_its_transfer(tmp_path):
    """A round: every device trains its steps on the whole model and uploads; then the downloads. Recomputed
    here from the per-layer FLOP counts of every batch."""
    devices = ["raspberry-pi-5@lte", "laptop-cpu@wifi5"]
    cfg = tiny_cfg(**FL, **{"federation.devices": devices, "federation.num_clients": 2, "train.epochs": 1})
    summary = run(cfg, tmp_path, progress=False)

    s = prepare(cfg)
    arch = arch_from_hf_config(s.split.lm.config, seq_len=cfg.data.max_length)
    devs = resolve_devices(devices, 2)
    _, clients = build_sfl(s, ByteCounter())
    train = []
    for c, dev in zip(clients, devs, strict=True):
        t = 0.0
        for b in c.epoch_batches(1):
            f, bw = layer_flops(arch, b.num_tokens, b.input_ids.shape[1], cfg.model.lora.rank)
            hf, hb = lm_head_flops(arch, b.num_tokens)
            t += compute_time(arch.n_layers * (f + bw) + hf + hb, dev)
        train.append(t)
    up = summary["bytes_by_stream"]["adapters_up"] // 2  # the same adapter size from both clients
    down = summary["bytes_by_stream"]["adapters_down"] // 2
    # the pull request (a small control message) goes up with the upload; count the upload alone here
    expect_up = max(t + transfer_time(up, d.uplink_bps, d.latency_s) for t, d in zip(train, devs, strict=True))
    expect_down = max(transfer_time(down, d.downlink_bps, d.latency_s) for d in devs)
    assert summary["simulated_s"] == pytest.approx(expect_up + expect_down, rel=1e-3)
    assert train[0] > train[1]  # the Pi is the slower device


def test_fl_trains_as_sfl_with_per_client_server_adapters(tmp_path):
    """The comparison is fair: with fp32 on the wire, SFL with per-client server adapters computes the same
    per-client training as FL (the head's and the body's adapters are one client's LoRA, averaged per block),
    so the two end at the same adapters up to float rounding; only what crosses the network differs."""
    cfg = {"train.epochs": 2, "federation.aggregate_every": 1}
    fl = run(tiny_cfg(**FL, **cfg), tmp_path / "fl", progress=False)
    sfl = run(tiny_cfg(**cfg), tmp_path / "sfl", progress=False)
    assert fl["val_loss_by_epoch"] == pytest.approx(sfl["val_loss_by_epoch"], abs=1e-5)
    assert fl["train_loss_by_epoch"] == pytest.approx(sfl["train_loss_by_epoch"], abs=1e-5)
    assert fl["rounds"] == sfl["rounds"] and fl["train_tokens"] == sfl["train_tokens"]
    assert "act_up" not in fl["bytes_by_stream"] and sfl["bytes_by_stream"]["act_up"] > 0
    # the whole adapter goes both ways in FL; SFL's clients send only their two blocks' share
    assert fl["bytes_by_stream"]["adapters_up"] > sfl["bytes_by_stream"]["adapters_up"]
    assert max(fl["client_memory_estimate_bytes"]) > max(sfl["client_memory_estimate_bytes"])


def test_the_fl_server_takes_adapters_only():
    """No activation or label reaches the server in fl: step traffic is refused naming the stream, and the
    server goes on."""
    from splitcom.protocol.messages import LabelsMsg

    s = prepare(tiny_cfg(**FL, **{"federation.num_clients": 1}))
    server, (client,) = build_sfl(s, ByteCounter())
    reply = serde.decode(server.handle_bytes(0, serde.encode(LabelsMsg(0, 0, {0: [1, 2, 3]}))))
    assert reply.kind == "error" and reply.body["field"] == "stream" and "federation.mode=fl" in reply.body["message"]
    client.train_step(client.epoch_batches(1)[0], 0)
    client.push_adapters(0)  # adapters still go through
    server.aggregate()
    client.pull_adapters(0)
    assert server.round == 1
