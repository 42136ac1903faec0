"""Adapter deltas (compression.adapter_refresh=delta): each round's LoRA exchange is the change since what
the receiver holds; the server's mirror of every client equals what the client holds, bit for bit."""

import pytest
import torch
from conftest import tiny_cfg, train_round

from splitcom.compress.adapter_delta import digest
from splitcom.errors import ProtocolError
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.protocol.messages import AdapterMsg, ControlMsg, Stream
from splitcom.transport.counters import ByteCounter

DELTA = {"compression.adapter_refresh": "delta", "compression.adapter_codec": "int8"}


@pytest.mark.parametrize("codec", ["int2", "int4", "fp32"])
@pytest.mark.parametrize("mode", ["standard", "ushape"])
def test_server_mirror_equals_what_each_client_holds(codec, mode):
    cfg = tiny_cfg(**DELTA, **{"compression.adapter_delta_codec": codec, "split.mode": mode, "split.tail_layers": 1})
    server, clients = build_sfl(prepare(cfg), ByteCounter())
    for r in range(3):
        trained = {}
        train_round(clients, r)  # one step each, then every client uploads the change since its start
        for c in clients:
            trained[c.cid] = c.bank.state(c.adapter, c.layers)
            got = server.uploads[c.cid].tensors  # what the server reconstructed: close to the trained adapter
            err = max(float((got[n] - t).abs().max()) for n, t in trained[c.cid].items())
            assert (err == 0.0) if codec == "fp32" else err < 0.05, err
        server.aggregate()
        for c in clients:
            c.pull_adapters(r)
            mirror = server.held.get(c.cid, c.held_digest)
            assert mirror is not None and mirror.keys() == c.held.keys()
            assert all(torch.equal(mirror[n], c.held[n]) for n in mirror)  # bit for bit
            assert all(torch.equal(t, c.held[n]) for n, t in c.bank.state(c.adapter, c.layers).items())


def test_deltas_are_smaller_and_train_the_same(tmp_path):
    over = {"train.epochs": 3}
    full = run(tiny_cfg(**over, **{"compression.adapter_codec": "int8"}), tmp_path / "full", progress=False)
    delta = run(tiny_cfg(**over, **DELTA), tmp_path / "delta", progress=False)
    for stream in ("adapters_up", "adapters_down"):
        ratio = delta["bytes_by_stream"][stream] / full["bytes_by_stream"][stream]
        assert ratio < 0.6, (stream, ratio)  # int4 deltas after the first exchange: half the bytes of int8
    assert delta["bytes_by_stream"]["act_up"] == full["bytes_by_stream"]["act_up"]
    assert abs(delta["val_loss"] - full["val_loss"]) < 0.01 * full["val_loss"]
    assert delta["client_cache_bytes"] > 0 and delta["server_cache_bytes"] > 0  # the mirrors' memory


def test_bad_bases_are_refused_and_change_nothing():
    server, clients = build_sfl(prepare(tiny_cfg(**DELTA)), ByteCounter())
    c = clients[0]
    state = {n: t - c.held[n] for n, t in c.bank.state(c.adapter, c.layers).items()}
    unknown = AdapterMsg(Stream.adapters_up, c.cid, 0, float(c.num_samples), state, c.cut, "int4", "none", 12345)
    with pytest.raises(ProtocolError) as err:
        server.handle(unknown)
    assert err.value.field == "base" and not server.uploads
    with pytest.raises(ProtocolError) as err:
        server.handle(ControlMsg(c.cid, 0, "pull_adapters", {"held": "abc"}))
    assert err.value.field == "body.held"
    # a pull naming a state the server does not know gets the adapter whole
    reply = server.handle(ControlMsg(c.cid, 0, "pull_adapters", {"held": 7}))
    assert reply.base == 0 and reply.codec == "int8"
    reply = server.handle(ControlMsg(c.cid, 0, "pull_adapters", {"held": digest(server.client_slice(c.cid))}))
    assert reply.base != 0 and reply.codec == "int4"
    # a client handed a delta to a state it does not hold refuses it before loading anything
    before = c.bank.state(c.adapter, c.layers)
    c.held_digest ^= 1
    c.channel = type("Stub", (), {"request": lambda self, msg: reply})()
    with pytest.raises(ProtocolError) as err:
        c.pull_adapters(0)
    assert err.value.field == "base"
    assert all(torch.equal(t, before[n]) for n, t in c.bank.state(c.adapter, c.layers).items())
