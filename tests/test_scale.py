"""Many clients (DESIGN 4.2): a client costs its adapter and optimizer state, held lazily for the blocks its
owner runs, and a 100-client run finishes in seconds."""

import math

import pytest
import torch
from conftest import tiny_cfg

from splitcom.errors import UserError
from splitcom.federation.setup import make_client, prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.models.adapters import GLOBAL, SLOT
from splitcom.models.split import layer_index
from splitcom.transport.counters import ByteCounter

HUNDRED = {"federation.num_clients": 100, "data.max_train_samples": 200, "train.epochs": 1,
           "train.batch_size": 2, "data.max_eval_samples": 8, "data.max_length": 32}


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from a second thread, and on a busy machine its spinning costs seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_hundred_clients_run(tmp_path, one_thread):
    summary = run(tiny_cfg(**HUNDRED), tmp_path, progress=False)
    s = prepare(tiny_cfg(**HUNDRED))
    assert summary["num_clients"] == 100 and summary["rounds"] == 1
    assert summary["client_samples"] == [len(p) for p in s.partitions] == [2] * 100
    # every client trained on every one of its samples, and every client's adapters went up and came down
    assert summary["train_tokens"] == sum(len(x.ids) for x in s.train)
    up = summary["bytes_by_stream"]["adapters_up"]
    assert up > 0 and summary["bytes_by_stream"]["adapters_down"] == up  # each client: its blocks, both ways
    assert math.isfinite(summary["val_loss"])


def test_per_client_state_is_the_owned_blocks_and_their_optimizer_state(one_thread):
    cfg = tiny_cfg(**{**HUNDRED, "federation.num_clients": 20, "data.max_train_samples": 40})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter(), cuts={cid: 1 + cid % 3 for cid in range(20)})
    for step, c in enumerate(clients):
        c.train_step(c.epoch_batches(1)[0], step)
    assert set(s.bank.model.peft_config) == {GLOBAL, SLOT}  # however many clients
    glob = s.bank.state(GLOBAL)
    full = sum(t.numel() * t.element_size() for t in glob.values())
    for c in clients:  # simulation: one bank, the client's blocks [0, k) and the server's [k, L) under one name
        assert {layer_index(k) for k in s.bank.state(c.adapter)} == set(range(s.split.num_layers))
        mine = c.optimizer.param_groups[0]["params"]
        theirs = server.optimizers[server.body_adapter(c.cid)].param_groups[0]["params"]
        assert sum(p.numel() * p.element_size() for p in mine + theirs) == full
        for opt in (c.optimizer, server.optimizers[server.body_adapter(c.cid)]):
            assert all(p.grad is None for p in opt.param_groups[0]["params"])  # no gradients kept between steps
            assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in opt.param_groups[0]["params"])
    # a client process holds only its own blocks
    alone = prepare(cfg)
    c = make_client(alone, 7, 2, channel=None)
    assert {layer_index(k) for k in alone.bank.state(c.adapter)} == {0, 1}
    assert all(torch.equal(v, glob[k]) for k, v in alone.bank.state(c.adapter).items())


def test_more_clients_than_samples_is_a_user_error():
    with pytest.raises(UserError, match=r"federation\.num_clients, data\.max_train_samples: 10 clients but 6"):
        prepare(tiny_cfg(**{"federation.num_clients": 10, "data.max_train_samples": 6}))
