"""train.server_epochs: the server's adapters train for the first epochs only, then freeze; a frozen server's
act_down for a reused act_up stops drifting, and U-shape clients send no grad_up where no grad_down comes back."""

import pytest
import torch
from conftest import bench_comm, tiny_cfg

from splitcom.errors import UserError
from splitcom.federation.setup import prepare, schedule_of, server_schedule_of
from splitcom.federation.simulation import build_sfl, run
from splitcom.models.split import unpad
from splitcom.protocol import serde
from splitcom.protocol.messages import ControlMsg, Stream
from splitcom.runlog import read_metrics
from splitcom.transport.counters import ByteCounter

U = {"split.mode": "ushape", "split.cut_layer": 1, "split.tail_layers": 1}
# every act_up reused from epoch 2 with no gradient for it; act_down refreshed whenever it drifts at all
LEAN = {"compression.temporal.enabled": True, "compression.temporal.streams": "[act_up,act_down]",
        "compression.temporal.threshold": "{act_up: -1.0, act_down: 0.99999}",
        "compression.temporal.reused_grad": "skip", "train.lr_schedule": "linear"}


@pytest.mark.parametrize("over,where", [
    ({"train.server_epochs": 3}, "train.server_epochs"),
    ({"train.server_epochs": 0}, "train.server_epochs"),
    ({"train.server_epochs": 1, "federation.mode": "centralized"}, "train.server_epochs"),
    ({"train.server_epochs": 1, "federation.mode": "fl"}, "train.server_epochs"),
    ({"train.server_decay": "epochs"}, "train.server_decay"),  # a hard stop with nothing to stop
    ({"train.server_epochs": 1, "train.server_decay": "halfway"}, "train.server_decay"),
])
def test_bad_server_epochs_name_the_key(tmp_path, over, where):
    with pytest.raises(UserError, match=where.replace(".", r"\.")):
        run(tiny_cfg(**over), tmp_path, progress=False)


def test_server_schedule_decays_over_its_own_epochs():
    s = prepare(tiny_cfg(**{"train.server_epochs": 1, "train.lr_schedule": "linear"}))
    server, frozen_from = server_schedule_of(s)
    client = schedule_of(s)
    assert frozen_from == server.total == client.total // 2  # 2 epochs for the clients, 1 for the server
    assert server.at(frozen_from) == 0.0 < client.at(frozen_from)
    assert server_schedule_of(prepare(tiny_cfg())) == (None, None)


def test_hard_stop_follows_the_clients_schedule_to_the_freeze():
    s = prepare(tiny_cfg(**{"train.server_epochs": 1, "train.server_decay": "epochs", "train.lr_schedule": "linear"}))
    server, frozen_from = server_schedule_of(s)
    client = schedule_of(s)
    assert server.total == client.total == 2 * frozen_from
    assert [server.at(k) for k in range(frozen_from + 1)] == [client.at(k) for k in range(frozen_from + 1)]
    assert server.at(frozen_from) == pytest.approx(client.lr / 2)  # where the freeze finds it: half the rate


def test_bench_forks_move_the_freeze_only_where_exact():
    """bench/comm.py --fork-from may move a hard stop later (the copied epochs are the row's own), never a freeze
    with its own decay, nor one that fell within the copied epochs."""
    comm = bench_comm()

    def train(**over):
        return tiny_cfg(**{"train.epochs": 8, "train.lr_schedule": "linear", **over}).train

    stop = {"train.server_decay": "epochs"}
    moved = ["train.server_epochs"]
    assert comm.server_fork_refusal(train(), train(), 4, ["compression.codec"]) is None  # the freeze untouched
    assert comm.server_fork_refusal(train(**{"train.server_epochs": 4}, **stop),
                                    train(**{"train.server_epochs": 5}, **stop), 4, moved) is None
    assert comm.server_fork_refusal(train(), train(**{"train.server_epochs": 6}, **stop), 4, moved) is None
    assert "froze after epoch 3" in comm.server_fork_refusal(
        train(**{"train.server_epochs": 3}, **stop), train(**{"train.server_epochs": 5}, **stop), 4, moved)
    assert "its own 5 epochs" in comm.server_fork_refusal(train(), train(**{"train.server_epochs": 5}), 4, moved)


def _epoch(server, clients, epoch: int, steps: int) -> None:
    for k in range(steps):
        for c in clients:
            batches = c.epoch_batches(epoch)
            if k < len(batches):
                c.train_step(batches[k], (epoch - 1) * steps + k)


@pytest.mark.parametrize("mode", ["sfl", "ushape"])
def test_frozen_server_adapters_do_not_move_while_clients_train(mode):
    cfg = tiny_cfg(**{"train.server_epochs": 1, "federation.server_adapters": "shared",
                      **(U if mode == "ushape" else {})})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter())
    steps = max(len(c.epoch_batches(1)) for c in clients)
    assert server.frozen_from == steps == clients[0].server_frozen_from
    _epoch(server, clients, 1, steps)
    body = range(cfg.split.cut_layer, server.end)
    before = s.bank.state(server.body_adapter(0), body)
    head = s.bank.state("c0", clients[0].layers)
    _epoch(server, clients, 2, steps)
    after = s.bank.state(server.body_adapter(0), body)
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: the server took no step
    moved = s.bank.state("c0", clients[0].layers)
    assert any(not torch.equal(head[k], moved[k]) for k in head)  # the client trained on


def _epoch_bytes(path, stream: str) -> list[int]:
    rounds = [e for e in read_metrics(path) if e["event"] == "round"]
    per, prev = {}, 0
    for e in rounds:
        now = e["bytes_by_stream"].get(stream, 0)
        per[e["epoch"]] = per.get(e["epoch"], 0) + now - prev
        prev = now
    return [per[k] for k in sorted(per)]


def test_ushape_frozen_server_sends_no_act_down_and_takes_no_grad_up(tmp_path):
    """Every act_up reused from epoch 2 under reused_grad=skip. A training server's act_down drifts (DELTAs every
    epoch) and every gradient goes up. One frozen after epoch 1 takes each grad_up as SKIP from epoch 2, sends
    act_down's last drift (made while it trained in epoch 1) as DELTAs in epoch 2, and REUSE from epoch 3."""
    over = {**U, **LEAN, "federation.server_adapters": "shared", "train.epochs": 3}
    base = run(tiny_cfg(**over), tmp_path / "b", progress=False)
    froz = run(tiny_cfg(**over, **{"train.server_epochs": 1}), tmp_path / "f", progress=False)
    down_b, down_f = (_epoch_bytes(tmp_path / r / "metrics.jsonl", "act_down") for r in "bf")
    up_b, up_f = (_epoch_bytes(tmp_path / r / "metrics.jsonl", "grad_up") for r in "bf")
    assert down_b[0] == down_f[0] and up_b[0] == up_f[0]  # the first sightings cost the same
    assert base["transfers_by_stream"]["act_down"]["reuse"] == 0
    assert froz["transfers_by_stream"]["act_down"]["reuse"] == 48  # every sample in epoch 3
    assert down_f[2] < 0.1 * down_b[2]
    assert up_f[1] < 0.1 * up_b[1] and up_f[2] < 0.1 * up_b[2]  # SKIP rows: a header and a flag per sample
    assert froz["val_loss"] < froz["initial_val_loss"]


def _pending_step(server, client, step: int):
    """Client 0's first act_up of epoch 2 (all reused) and the server's pending forward for it."""
    batch = client.epoch_batches(2)[0]
    client.bank.activate(client.adapter, client.layers)
    h = client.split.head(batch.input_ids, batch.lengths, client.cut)
    msg = client.out[Stream.act_up].message(client.cid, step, batch.sample_ids, unpad(h.detach(), batch.lengths))
    assert all(s.reuse for s in msg.samples)
    server.handle_bytes(client.cid, serde.encode(msg))
    return batch


@pytest.mark.parametrize("frozen", [False, True])
def test_skip_grad_up_where_a_gradient_is_needed_is_refused(frozen):
    """A SKIP row on grad_up before the freeze, or for a sample whose grad_down is due, is an error reply naming
    the sample's field; the pending forward stays, and a proper grad_up is then served."""
    over = {**U, **LEAN, "federation.server_adapters": "shared", "train.server_epochs": 1 if frozen else 2}
    if frozen:  # gradients for reused samples come back: each is due
        over["compression.temporal.reused_grad"] = "apply"
    s = prepare(tiny_cfg(**over))
    server, clients = build_sfl(s, ByteCounter())
    steps = max(len(c.epoch_batches(1)) for c in clients)
    _epoch(server, clients, 1, steps)
    c = clients[0]
    batch = _pending_step(server, c, steps)
    bad = c.out[Stream.grad_up].message(c.cid, steps, batch.sample_ids,
                                        [torch.zeros(n, s.split.hidden_size) for n in batch.lengths],
                                        skip={batch.sample_ids[0]})
    reply = serde.decode(server.handle_bytes(c.cid, serde.encode(bad)))
    assert isinstance(reply, ControlMsg) and reply.kind == "error"
    assert reply.body["field"] == "samples[0]" and "SKIP is not valid on grad_up" in reply.body["message"]
    assert c.cid in server.pending
    good = c.out[Stream.grad_up].message(c.cid, steps, batch.sample_ids,
                                         [torch.zeros(n, s.split.hidden_size) for n in batch.lengths])
    assert serde.decode(server.handle_bytes(c.cid, serde.encode(good))).stream == Stream.grad_down



def _evals(path) -> list[float]:
    return [e["val_loss"] for e in read_metrics(path) if e["event"] == "eval"]


def test_skip_from_epoch_applies_the_gradients_until_then(tmp_path):
    """compression.temporal.skip_from_epoch: REUSEd act_up get their gradient (as under `apply`) before that epoch
    and none from it. Every act_up is reused from epoch 2: a run skipping from epoch 3 is the `apply` run through
    epoch 2, to the bit, and its epoch 3 sends the `skip` run's SKIP rows; a frozen server (train.server_epochs)
    takes SKIP grad_up only where it skips."""
    over = {**U, **LEAN, "federation.server_adapters": "shared", "train.epochs": 3, "train.server_epochs": 1}
    runs = {"apply": {"compression.temporal.reused_grad": "apply"}, "skip": {},
            "from3": {"compression.temporal.skip_from_epoch": 3}}
    for name, extra in runs.items():
        run(tiny_cfg(**{**over, **extra}), tmp_path / name, progress=False)
    down = {n: _epoch_bytes(tmp_path / n / "metrics.jsonl", "grad_down") for n in runs}
    up = {n: _epoch_bytes(tmp_path / n / "metrics.jsonl", "grad_up") for n in runs}
    assert down["from3"][:2] == down["apply"][:2] and up["from3"][:2] == up["apply"][:2]
    assert down["from3"][2] == down["skip"][2] < 0.1 * down["apply"][2]
    assert up["from3"][2] == up["skip"][2] < 0.1 * up["apply"][2]  # frozen and skipping: SKIP rows go up
    assert down["skip"][1] < 0.1 * down["apply"][1]  # (the plain skip run skips from epoch 2)
    ev = {n: _evals(tmp_path / n / "metrics.jsonl") for n in runs}
    assert ev["from3"][:3] == ev["apply"][:3] and ev["from3"][3] != ev["apply"][3]


@pytest.mark.parametrize("over,match", [
    ({"compression.temporal.skip_from_epoch": 2}, "reused_grad is 'apply'"),
    ({"compression.temporal.reused_grad": "skip", "compression.temporal.skip_from_epoch": 3}, "train.epochs = 2"),
    ({"compression.temporal.reused_grad": "skip", "compression.temporal.skip_from_epoch": 0}, "greater than or equal"),
])
def test_bad_skip_from_epoch_names_the_key(tmp_path, over, match):
    with pytest.raises(UserError, match=match) as err:
        run(tiny_cfg(**{"compression.temporal.enabled": True, **over}), tmp_path, progress=False)
    assert "compression.temporal.skip_from_epoch" in str(err.value)


def test_bench_forks_change_the_gradient_skip_only_where_exact():
    """bench/comm.py --fork-from may start skipping the gradients of reused activations later than the parent's
    epochs (those applied them as the row would), never within them."""
    comm = bench_comm()

    def cfg(**over):
        return tiny_cfg(**{"train.epochs": 8, "compression.temporal.enabled": True, **over})

    apply, skip = cfg(), cfg(**{"compression.temporal.reused_grad": "skip"})
    later = cfg(**{"compression.temporal.reused_grad": "skip", "compression.temporal.skip_from_epoch": 4})
    assert comm.skip_fork_refusal(apply, later, 3) is None
    assert comm.skip_fork_refusal(later, later, 6) is None
    assert "applied the gradients of reused activations in epoch 4" in comm.skip_fork_refusal(apply, later, 4)
    assert "skipped the gradients of reused activations in epoch 1" in comm.skip_fork_refusal(skip, later, 3)
    assert {"compression.temporal.reused_grad", "compression.temporal.skip_from_epoch"} <= set(comm.FORKABLE)
