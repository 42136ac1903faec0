"""Tests for the temporal-reuse threshold controllers (splitcom.compress.control)."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
import torch

from splitcom.compress.control import (
    CONTROLLERS,
    BangBangController,
    DDPGController,
    FixedController,
    IntervalStats,
    make_controller,
)
from splitcom.errors import UserError

LOW, HIGH = 0.9, 0.9999  # 1 - t spans 1e-1 .. 1e-4
OBS = np.array([0.5, -2.0, 0.3, 1.0, 0.0, 0.7], dtype=np.float32)


def stats(loss: float, threshold: float = 0.99, progress: float = 0.5, sent: int = 500, full: int = 1000):
    return IntervalStats(progress=progress, threshold=threshold, reuse_ratio=1 - sent / max(full, 1), val_loss=loss,
                         bytes_sent=sent, bytes_full=full)


# ---------------------------------------------------------------------------------------------- fixed
def test_fixed_returns_its_threshold():
    c = make_controller("fixed", {"threshold": 0.999}, seed=3)
    assert isinstance(c, FixedController) and c.name == "fixed"
    assert c.initial() == 0.999
    for loss in (3.0, 2.0, 5.0, float("nan")):
        assert c.update(stats(loss)) == 0.999
    assert c.state_dict() == {"name": "fixed", "threshold": 0.999}


# ------------------------------------------------------------------------------------------- bangbang
def test_bangbang_switching_sequence_previous_reference():
    c = BangBangController(aggressive=0.99, conservative=0.9999, tolerance=0.0, start="conservative")
    A, C = 0.99, 0.9999
    assert c.initial() == C
    losses = [3.0, 2.5, 2.4, 2.6, 2.55, 2.55, float("nan"), 2.0, 2.1]
    # first validation: no reference -> keep level; then <= previous -> A, > previous -> C;
    # equal counts as improving; NaN -> C and is not recorded (2.0 is compared with 2.55)
    expected = [C, A, A, C, A, A, C, A, C]
    assert [c.update(stats(v)) for v in losses] == expected


def test_bangbang_tolerance_and_best_reference():
    c = BangBangController(0.99, 0.9999, tolerance=0.05, reference="best")
    assert c.initial() == 0.99  # default start is aggressive
    # best: 2.0 -> 2.08 within 5% of best (A) -> 2.2 > 2.1 (C) -> 2.09 within 5% of best 2.0 (A)
    assert [c.update(stats(v)) for v in (2.0, 2.08, 2.2, 2.09, 1.5, 1.6)] == [0.99, 0.99, 0.9999, 0.99,
                                                                               0.99, 0.9999]
    assert c.state_dict()["best"] == 1.5


def test_bangbang_rejects_bad_levels():
    with pytest.raises(UserError, match="compression.temporal.bangbang.aggressive"):
        BangBangController(aggressive=0.9999, conservative=0.99)
    with pytest.raises(UserError, match="compression.temporal.bangbang.start"):
        BangBangController(0.99, 0.999, start="sideways")


# --------------------------------------------------------------------------------------------- registry
def test_registry_and_unknown_name():
    assert set(CONTROLLERS) == {"fixed", "bangbang", "ddpg"}
    with pytest.raises(UserError) as e:
        make_controller("pid", {}, seed=0)
    assert e.value.where == "compression.temporal.controller" and "pid" in str(e.value)
    with pytest.raises(UserError, match="compression.temporal.fixed"):
        make_controller("fixed", {"threshold": 0.9, "gain": 2}, seed=0)
    with pytest.raises(UserError, match="threshold"):
        make_controller("fixed", {}, seed=0)
    c = make_controller("bangbang", aggressive=0.99, conservative=0.999, seed=0)
    assert isinstance(c, BangBangController)


# ------------------------------------------------------------------------------------------------ ddpg
def toy_run(c: DDPGController, episodes: int, n: int = 20) -> list[float]:
    """Synthetic training where the stats follow from the chosen threshold; returns the rewards.

    With aggressiveness x = (1 - a) / 2 in [0, 1] (a: the threshold as an action), an interval saves a
    fraction 0.9 min(x, 0.6) of the bytes and changes the loss by a relative -0.05 + 2.5 max(0, x - 0.3),
    so the controller's reward is ``toy_reward(x)``: 0 at x = 0, best 0.288 at x = 0.32, 0 at x = 0.5
    (about where an untrained actor, a ~ 0, sits), -0.46 from x = 0.72 on.
    """
    rewards = []
    for _ in range(episodes):
        t, loss = c.initial(), 2.0
        for k in range(n):
            assert LOW <= t <= HIGH
            x = (1.0 - c.threshold_to_action(t)) / 2.0
            loss *= 1.0 - 0.05 + 2.5 * max(0.0, x - 0.3)
            saved = 0.9 * min(x, 0.6)
            t = c.update(IntervalStats(progress=(k + 1) / n, threshold=t, reuse_ratio=saved, val_loss=loss,
                                       bytes_sent=round(1e6 * (1.0 - saved)), bytes_full=10**6))
            rewards.append(c.last_reward)
    return rewards


def toy_reward(x: float) -> float:
    return 0.9 * min(x, 0.6) - min(1.0, max(0.0, -0.05 + 2.5 * max(0.0, x - 0.3)))


def greedy_eval(c: DDPGController) -> float:
    """Mean reward of one toy run acting greedily (no noise) and without learning."""
    c.gradient_steps, c.noise_std, c.noise_min = 0, 0.0, 0.0
    return float(np.mean(toy_run(c, episodes=1)))


def test_ddpg_action_mapping_is_log_scaled_and_bounded():
    c = DDPGController(LOW, HIGH, seed=0, gradient_steps=0)
    assert c.action_to_threshold(-1.0) == pytest.approx(LOW) and c.action_to_threshold(1.0) == pytest.approx(HIGH)
    assert c.action_to_threshold(-1 / 3) == pytest.approx(0.99) and c.action_to_threshold(1 / 3) == pytest.approx(0.999)
    for a in (-5.0, -1.0, 0.0, 0.3, 1.0, 7.0):
        assert LOW <= c.action_to_threshold(a) <= HIGH
        assert c.threshold_to_action(c.action_to_threshold(a)) == pytest.approx(max(-1.0, min(1.0, a)), abs=1e-9)


def test_ddpg_actions_within_bounds_and_rng_untouched():
    torch.manual_seed(123)
    np.random.seed(123)
    expect_t, expect_np = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    c = make_controller("ddpg", {"low": LOW, "high": HIGH, "noise_std": 2.0, "gradient_steps": 4}, seed=1)
    assert LOW <= c.initial() <= HIGH
    toy_run(c, episodes=1, n=12)  # asserts every threshold is within [low, high]
    for obs in (OBS, OBS * 100, -OBS * 100):
        assert LOW <= c.greedy_threshold(obs) <= HIGH
    # SB3 samples from the global RNGs: the controller must not disturb the caller's streams
    assert torch.equal(torch.rand(3), expect_t) and np.array_equal(np.random.rand(3), expect_np)


def test_ddpg_is_deterministic_per_seed_whatever_the_global_rng():
    runs = []
    for g in (1, 2):
        np.random.seed(g)
        torch.manual_seed(g)
        runs.append(toy_run(DDPGController(LOW, HIGH, seed=5, gradient_steps=4), episodes=1, n=10))
    assert runs[0] == runs[1]
    assert runs[0] != toy_run(DDPGController(LOW, HIGH, seed=6, gradient_steps=4), episodes=1, n=10)


def test_ddpg_exploration_noise_decays():
    c = DDPGController(LOW, HIGH, seed=0, noise_std=0.5, noise_decay=0.5, noise_min=0.05, gradient_steps=0)
    c.initial()
    sigmas, offsets = [], []
    for k in range(6):
        sigmas.append(c.noise_sigma())
        t = c.update(stats(2.0, progress=k / 10))
        offsets.append(abs(c.threshold_to_action(t) - c.greedy_action(c.observe(stats(2.0, progress=k / 10)))))
    assert sigmas == pytest.approx([0.5, 0.25, 0.125, 0.0625, 0.05, 0.05])
    assert offsets[0] > 1e-3  # the returned threshold carries the noise, the greedy one does not


def test_ddpg_reward_and_observation():
    c = DDPGController(LOW, HIGH, seed=0, loss_weight=2.0, gradient_steps=0)
    c.initial()
    c.update(stats(2.0, sent=800, progress=0.25))  # first interval: no loss change
    assert c.last_reward == pytest.approx(0.2)
    s = stats(2.2, threshold=0.999, sent=400, progress=0.5)
    obs = c.observe(s)
    assert obs == pytest.approx([0.5, -3.0, 0.6, 1.1, 0.1, 0.4], abs=1e-6)
    assert c.reward(s) == pytest.approx(0.6 - 2.0 * 0.1)
    assert c.reward(stats(1.5, sent=400)) == pytest.approx(0.6)  # improvements are not rewarded extra
    assert c.reward(stats(float("nan"), sent=400)) == pytest.approx(0.6 - 2.0)
    assert c.agent.replay_buffer.size() == 0  # the first interval of a run gives no transition


def test_ddpg_learns_toy_optimum():
    # Deterministic for a seed (private RNG states, one torch thread); 11 of seeds 0-11 pass all of this.
    c = DDPGController(LOW, HIGH, seed=0)
    rewards = toy_run(c, episodes=3)
    assert c.agent.replay_buffer.size() == 3 * 19  # one transition per interval but the first of a run
    first, last = float(np.mean(rewards[:10])), float(np.mean(rewards[-10:]))
    assert last > first + 0.1, (first, last)
    trained, untrained = greedy_eval(c), greedy_eval(DDPGController(LOW, HIGH, seed=0))
    assert trained > 0.2, trained  # at most 0.288 * 19 / 20 (the first interval uses initial())
    assert trained > untrained + 0.05, (trained, untrained)


def test_ddpg_save_load_round_trip(tmp_path):
    c = DDPGController(LOW, HIGH, seed=2, gradient_steps=8)
    toy_run(c, episodes=1, n=10)
    path = c.save(tmp_path / "ckpt")  # no suffix: SB3 alone would write ckpt.zip
    assert path == str(tmp_path / "ckpt") and zipfile.is_zipfile(path)
    warm = make_controller("ddpg", {"low": LOW, "high": HIGH, "load": path}, seed=99)
    probes = [OBS, OBS * 0.5, np.array([0.9, -3.5, 0.8, 1.4, 0.2, 0.2], dtype=np.float32)]
    for obs in probes:
        assert warm.greedy_action(obs) == c.greedy_action(obs)
    assert warm.intervals == c.intervals and warm.noise_sigma() == c.noise_sigma()
    assert warm.agent.replay_buffer.size() == c.agent.replay_buffer.size() == 9
    assert np.array_equal(warm.agent.replay_buffer.rewards[:9], c.agent.replay_buffer.rewards[:9])
    fresh = DDPGController(LOW, HIGH, seed=2, gradient_steps=8)
    assert any(fresh.greedy_action(o) != c.greedy_action(o) for o in probes)  # the probe can tell
    warm.initial()
    assert LOW <= warm.update(stats(2.0, threshold=HIGH)) <= HIGH  # keeps learning after the load


def test_ddpg_load_missing_file(tmp_path):
    missing = tmp_path / "nope.zip"
    with pytest.raises(UserError) as e:
        DDPGController(LOW, HIGH, load=str(missing))
    assert e.value.where == "compression.temporal.ddpg.load" and str(missing) in str(e.value)


def test_ddpg_load_incompatible_files(tmp_path):
    import gymnasium as gym
    from stable_baselines3 import DDPG

    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    other_space = tmp_path / "other.zip"
    DDPG("MlpPolicy", gym.make("Pendulum-v1"), buffer_size=100, policy_kwargs={"net_arch": [8]},
         device="cpu").save(other_space)  # 3-dim observation instead of 6
    ok = tmp_path / "ok.zip"
    DDPGController(LOW, HIGH, seed=0, gradient_steps=0).save(ok)
    for bad, kw in ((junk, {}), (other_space, {}), (ok, {"high": 0.999}), (ok, {"net_arch": [16]})):
        with pytest.raises(UserError) as e:
            DDPGController(**{"low": LOW, "high": HIGH, **kw}, load=str(bad))
        assert e.value.where == "compression.temporal.ddpg.load" and str(bad) in str(e.value), e.value


def test_interval_stats_validation():
    assert stats(1.0, sent=0, full=0).bytes_fraction == 1.0
    with pytest.raises(ValueError):
        stats(1.0, progress=1.5)
    assert math.isclose(stats(1.0, sent=250, full=1000).bytes_fraction, 0.25)
