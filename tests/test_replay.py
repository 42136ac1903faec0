"""The clock replay (fleet/replay.py): a run's simulated time on another fleet, from its config and log."""

import json

import pytest

from splitcom.runlog import read_metrics
from tests.conftest import tiny_cfg


@pytest.mark.parametrize("mode", ["sfl", "fl", "ushape"])
def test_replay_on_the_runs_own_fleet_gives_its_logged_clock(tmp_path, mode):
    from splitcom.federation.simulation import run
    from splitcom.fleet.replay import replay, time_to_quality

    over = {"federation.devices": "mixed10", "compression.temporal.enabled": "true",
            "compression.entropy": "zstd", "compression.codec": "int8"}
    if mode == "fl":
        over = {"federation.mode": "fl", "federation.devices": "mixed10", "compression.entropy": "zstd"}
    if mode == "ushape":
        over.update({"split.mode": "ushape", "split.tail_layers": 1})
    run(tiny_cfg(**over), tmp_path, progress=False)
    own = replay(tmp_path)
    assert [e["epoch"] for e in own] == [1, 2]
    for e in own:
        assert e["simulated_s"] == pytest.approx(e["logged_s"], rel=1e-6)
    lte = replay(tmp_path, devices="jetson-orin-nx@lte")
    assert all(a["simulated_s"] != b["simulated_s"] for a, b in zip(own, lte, strict=True))
    assert [e["val_ppl"] for e in lte] == [e["val_ppl"] for e in own]
    assert time_to_quality(own, own[-1]["val_ppl"]) == own[-1]["simulated_s"]
    assert time_to_quality(own, 0.0) is None
    # a log from before `adapter_bytes`: the even split of the round's total stays within a hair
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "adapter_bytes"}) + "\n"
                           for e in read_metrics(log)))
    for a, b in zip(replay(tmp_path), own, strict=True):
        assert a["simulated_s"] == pytest.approx(b["simulated_s"], rel=1e-3)


def test_replay_refuses_what_it_cannot_rebuild(tmp_path):
    from splitcom.errors import UserError
    from splitcom.federation.simulation import run
    from splitcom.fleet.replay import replay

    run(tiny_cfg(**{"logging.log_every": 2, "train.epochs": 1}), tmp_path, progress=False)
    with pytest.raises(UserError, match="log_every"):
        replay(tmp_path)
