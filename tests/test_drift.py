"""The drift probe (logging.drift): true 1 - cos between a sample's sightings, as the regime tables report it."""

import torch

from splitcom.compress.drift import DriftProbe, stats
from tests.conftest import tiny_cfg


def test_probe_measures_the_tensor_itself():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    p = DriftProbe()
    p.sighting(1, x)
    p.was_sent(1, x)
    assert p.take() == {"between": [], "between_channel": [], "stale": [], "summary": []}  # a first sight
    p.sighting(1, x, summary_similarity=0.75)
    got = p.take()
    assert abs(got["between"][0]) < 1e-3 and abs(got["stale"][0]) < 1e-3 and got["summary"] == [0.25]
    y = x.clone()
    y[:, 0] *= -1  # one channel flips: a massive channel dominates the plain cosine, not the normalised one
    x_massive = x.clone()
    x_massive[:, 0] *= 100
    y_massive = y.clone()
    y_massive[:, 0] *= 100
    p.sighting(2, x_massive)
    p.sighting(2, y_massive)
    got = p.take()
    assert got["between"][0] > 1.9  # cos about -1: the flipped massive channel is nearly all the norm
    assert 0.1 < got["between_channel"][0] < 0.5  # one channel of eight flipped, once channels weigh equally
    assert stats({"between": [0.0, 1.0, 2.0], "stale": []}) == \
        {"between": {"median": 1.0, "p90": 1.8, "mean": 1.0, "n": 3}}


def test_runs_log_drift_by_epoch_and_resume_keeps_measuring(tmp_path, monkeypatch):
    from splitcom.federation import simulation
    from splitcom.runlog import read_metrics

    over = {"logging.drift": "true", "compression.temporal.enabled": "true", "train.epochs": 3,
            "compression.temporal.threshold": 0.999}
    full = simulation.run(tiny_cfg(**over), tmp_path / "full", progress=False)
    events = [e for e in read_metrics(tmp_path / "full" / "metrics.jsonl") if e["event"] == "reuse"]
    assert "drift" not in events[0]  # epoch 1: every sample seen once
    for e in events[1:]:
        d = e["drift"]
        assert set(d) == {"act_up", "grad_down"}
        assert d["act_up"]["between"]["n"] == 48 and 0 < d["act_up"]["between"]["median"] < 1
        assert d["act_up"]["summary"]["n"] == 48 and d["act_up"]["stale"]["n"] == 48
    # the mechanism is untouched: the same run without the probe sends the same bytes
    plain = simulation.run(tiny_cfg(**{**over, "logging.drift": "false"}), tmp_path / "plain", progress=False)
    assert plain["bytes_by_stream"] == full["bytes_by_stream"]
    # killed after epoch 2 and resumed: epoch 3's drift is measured against epoch 2's tensors, as before
    real = simulation.evaluate_loss
    calls = {"n": 0}

    def crash(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 0, 1, 2 evaluated; die at epoch 3's
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(simulation, "evaluate_loss", crash)
    try:
        simulation.run(tiny_cfg(**over), tmp_path / "cut", progress=False)
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(simulation, "evaluate_loss", real)
    simulation.run(tiny_cfg(**over), tmp_path / "cut", progress=False, resume=True)
    resumed = [e for e in read_metrics(tmp_path / "cut" / "metrics.jsonl") if e["event"] == "reuse"]
    assert resumed[2]["drift"] == events[2]["drift"]


def test_a_run_without_the_probe_resumes_with_it(tmp_path):
    """logging.drift is a diagnostic: a plain fp32 run checkpointed without it goes on with it (nothing to
    restore; drift is measured from the resume on), lengthened to one more epoch, as the 3-epoch plain run ends."""
    from splitcom.federation import simulation

    plain = simulation.run(tiny_cfg(**{"train.epochs": 2}), tmp_path / "plain", progress=False)
    longer = simulation.run(tiny_cfg(**{"train.epochs": 3, "logging.drift": "true"}), tmp_path / "plain",
                            progress=False, resume=True)
    full = simulation.run(tiny_cfg(**{"train.epochs": 3}), tmp_path / "full", progress=False)
    assert longer["val_loss_by_epoch"][:2] == plain["val_loss_by_epoch"]
    assert longer["val_loss_by_epoch"] == full["val_loss_by_epoch"]
    assert longer["bytes_by_stream"] == full["bytes_by_stream"]
