"""The learning-rate schedule (train.lr_schedule, train.warmup_steps; federation/schedule.py)."""

import pytest
import torch
from conftest import tiny_cfg

from splitcom.errors import UserError
from splitcom.federation.centralized import CentralizedTrainer
from splitcom.federation.schedule import LRSchedule
from splitcom.federation.setup import prepare, schedule_of
from splitcom.federation.simulation import build_sfl, run
from splitcom.models.adapters import GLOBAL
from splitcom.transport.counters import ByteCounter


@pytest.mark.parametrize("kind,hf", [("constant", "constant_with_warmup"), ("linear", "linear"),
                                     ("cosine", "cosine")])
def test_the_curves_are_transformers_schedules(kind, hf):
    """Step k's rate is what Hugging Face's scheduler of that name gives its optimizer's k-th step."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    ref = get_scheduler(hf, opt, num_warmup_steps=3, num_training_steps=20)
    ours = LRSchedule(2e-3, kind, 3, 20)
    for step in range(20):
        assert ours.at(step) == pytest.approx(ref.get_last_lr()[0], rel=1e-12, abs=1e-15), step
        opt.step()
        ref.step()
    assert ours.at(25) == ours.at(20) and ours.at(-1) == 0.0  # clamped to the run


def test_constant_without_warmup_is_no_schedule():
    s = prepare(tiny_cfg())
    assert schedule_of(s) is None
    got = schedule_of(prepare(tiny_cfg(**{"train.lr_schedule": "linear"})))
    # 48 samples over 3 clients, batch 8: the largest client has 2 batches an epoch; 2 epochs
    assert got == LRSchedule(0.003, "linear", 0, 2 * max(-(-len(p) // 8) for p in s.partitions))


def test_one_client_sfl_equals_centralized_under_a_decay():
    """Split training under a warmed-up linear decay is the centralized PEFT training under the same rates:
    the client's and the server's optimizers both set the rate of the step's global number."""
    cfg = tiny_cfg(**{"federation.num_clients": 1, "train.lr_schedule": "linear", "train.warmup_steps": 1,
                      "train.epochs": 1})
    a = prepare(cfg)
    server, (client,) = build_sfl(a, ByteCounter())
    b = prepare(cfg)
    central = CentralizedTrainer(b.split.model, b.bank, b.train, lr=cfg.train.lr, batch_size=cfg.train.batch_size,
                                 pad_id=b.pad_id, schedule=schedule_of(b))
    batches = client.epoch_batches(1)
    for step, batch in enumerate(batches):
        assert abs(client.train_step(batch, step) - central.train_step(batch, step)) < 1e-5
    last = schedule_of(a).at(len(batches) - 1)
    assert 0 < last < cfg.train.lr
    assert client.optimizer.param_groups[0]["lr"] == last == central.optimizer.param_groups[0]["lr"]
    assert server.optimizers[server.body_adapter(0)].param_groups[0]["lr"] == last
    got = a.bank.state("c0", range(cfg.split.cut_layer))
    got.update(a.bank.state(server.body_adapter(0), range(cfg.split.cut_layer, a.split.num_layers)))
    ref = b.bank.state(GLOBAL)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0)


def test_a_decay_changes_training_and_cannot_be_lengthened(tmp_path):
    flat = run(tiny_cfg(**{"train.epochs": 1}), tmp_path / "flat", progress=False)
    cfg = tiny_cfg(**{"train.epochs": 1, "train.lr_schedule": "cosine"})
    decay = run(cfg, tmp_path / "decay", progress=False)
    assert decay["val_loss"] != flat["val_loss"] and decay["bytes_by_stream"] == flat["bytes_by_stream"]
    longer = tiny_cfg(**{"train.epochs": 2, "train.lr_schedule": "cosine"})
    with pytest.raises(UserError, match="cannot be lengthened") as err:
        run(longer, tmp_path / "decay", progress=False, resume=True)
    assert err.value.where == "train.epochs"
    assert (tmp_path / "decay" / "summary.json").is_file()  # nothing lost
