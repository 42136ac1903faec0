"""The DDPG threshold controller: a stable-baselines3 agent learning online, one transition per control
interval, and the gymnasium environment that only carries its spaces."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from splitcom.compress.control.rules import IntervalStats, ThresholdController, check
from splitcom.errors import UserError

LOAD_KEY = "compression.temporal.ddpg.load"
OBS_DIM = 6
LOSS_CLIP = 10.0  # the observed loss ratio L / L_first is clipped to [0, LOSS_CLIP]


class DDPGController(ThresholdController):
    """Online stable-baselines3 DDPG agent whose action is the threshold (CPU only, tiny MLPs).

    Action: ``a`` in ``[-1, 1]`` maps linearly to ``u = log10(1 - t)`` between ``log10(1 - low)``
    (``a = -1``, threshold ``low``, most reuse) and ``log10(1 - high)`` (``a = +1``, threshold ``high``).

    Observation after an interval (float32, 6 values):
    ``[progress, log10(1 - threshold used), reuse_ratio, val_loss / first_val_loss, dL,
    bytes_sent / bytes_full]`` where ``dL = (val_loss - prev_val_loss) / prev_val_loss`` clipped to
    [-1, 1] (0 for the first interval). The loss is divided by the run's first validation loss (and
    clipped to [0, 10]) so the nets see one scale whatever the task's loss scale, and warm starts
    transfer between tasks.

    Reward of an interval: ``r = (1 - bytes_sent / bytes_full) - loss_weight * max(0, dL)``, i.e. the
    fraction of bytes saved minus the weighted relative validation-loss increase. A NaN/inf loss counts
    as ``dL = 1`` (and the observed loss stays at the previous value).

    Learning: one transition (obs before the interval, action of the threshold actually used, reward,
    obs after, done = progress >= 1) per ``update`` is added with ``agent.replay_buffer.add``; the first
    interval (threshold from ``initial()``, no observation to act from) gives none. Once the buffer
    holds ``learning_starts`` transitions each update runs ``agent.train(gradient_steps, batch_size)``.
    ``gamma`` defaults to 0.5: a threshold shows mostly in its own interval's bytes and loss, and a short
    horizon keeps the bootstrapped critic stable on the few transitions a run gives (0.9 often got
    stuck at a bound on the toy problem of the tests).
    Exploration: Gaussian noise on ``a`` with std ``max(noise_min, noise_std * noise_decay**k)`` after
    ``k`` updates (``k`` persists through save/load). SB3 draws replay samples from the global NumPy
    RNG and initialises networks from the global torch RNG, so all agent work runs on private RNG
    states swapped in and out, on one torch thread (the caller's random streams are untouched; not
    thread-safe).

    ``save(path)`` writes one SB3 zip (exactly at ``path``) carrying the networks plus the controller
    state and replay-buffer contents; ``load=path`` warm-starts from it: networks, replay buffer and noise
    decay carry over, a new run starts a new episode (SB3 unpickles the zip: load trusted files only).
    """

    name = "ddpg"

    def __init__(self, low: float = 0.99, high: float = 0.9999, *, seed: int = 0, load: str | None = None,
                 loss_weight: float = 1.0, initial: float | None = None, noise_std: float = 0.5,
                 noise_decay: float = 0.95, noise_min: float = 0.02, learning_rate: float = 1e-3,
                 gamma: float = 0.5, tau: float = 0.05, batch_size: int = 32, gradient_steps: int = 32,
                 learning_starts: int = 4, buffer_size: int = 10_000, net_arch: list[int] | tuple[int, ...] = (32, 32)):
        check(0.0 < float(low) < float(high) < 1.0, self.name, "low", f"need 0 < low < high < 1, got {low}, {high}")
        check(loss_weight >= 0, self.name, "loss_weight", f"must be >= 0, got {loss_weight}")
        check(batch_size >= 1 and gradient_steps >= 0 and learning_starts >= 1, self.name, "batch_size",
               "batch_size and learning_starts must be >= 1, gradient_steps >= 0")
        self.low, self.high = float(low), float(high)
        self._u_lo, self._u_hi = math.log10(1.0 - self.low), math.log10(1.0 - self.high)
        self.loss_weight, self.net_arch = float(loss_weight), [int(n) for n in net_arch]
        self.noise_std, self.noise_decay, self.noise_min = float(noise_std), float(noise_decay), float(noise_min)
        self.batch_size, self.gradient_steps, self.learning_starts = batch_size, gradient_steps, learning_starts
        self._initial = self.high if initial is None else min(max(float(initial), self.low), self.high)
        self.intervals = 0  # updates so far (drives the noise decay)
        self._noise_rng = np.random.default_rng(seed)
        self._np_state = np.random.RandomState(seed).get_state()
        self._torch_state = torch.Generator().manual_seed(seed).get_state()
        self._prev_obs: np.ndarray | None = None
        self._prev_loss: float | None = None
        self._first_loss: float | None = None  # first finite validation loss of the current run
        self.last_threshold = self._initial
        self.last_reward: float | None = None  # reward of the interval seen by the latest update

        from stable_baselines3 import DDPG
        from stable_baselines3.common.logger import Logger

        env = _spaces_env()
        hyper = dict(learning_rate=learning_rate, gamma=gamma, tau=tau, buffer_size=buffer_size)
        with self._private_rng():
            if load is None:
                self.agent = DDPG("MlpPolicy", env, learning_starts=learning_starts, batch_size=batch_size,
                                  policy_kwargs={"net_arch": self.net_arch}, device="cpu", verbose=0, **hyper)
            else:
                self.agent = self._load(os.fspath(load), env, hyper)
        # train() logs through agent.logger, normally created by learn(); we never call learn().
        # Logger(None, []) writes nothing (logger.configure() would create a temp folder).
        self.agent.set_logger(Logger(folder=None, output_formats=[]))

    # -- action <-> threshold -------------------------------------------------------------------------
    def action_to_threshold(self, a: float) -> float:
        a = min(max(float(a), -1.0), 1.0)
        t = 1.0 - 10.0 ** (self._u_lo + (a + 1.0) / 2.0 * (self._u_hi - self._u_lo))
        return min(max(t, self.low), self.high)

    def threshold_to_action(self, t: float) -> float:
        t = min(max(float(t), self.low), self.high)
        return min(max(2.0 * (math.log10(1.0 - t) - self._u_lo) / (self._u_hi - self._u_lo) - 1.0, -1.0), 1.0)

    # -- observation / reward -------------------------------------------------------------------------
    def _rel_change(self, stats: IntervalStats) -> float:
        if not math.isfinite(stats.val_loss):
            return 1.0
        if self._prev_loss is None:
            return 0.0
        return min(max((stats.val_loss - self._prev_loss) / max(abs(self._prev_loss), 1e-8), -1.0), 1.0)

    def observe(self, stats: IntervalStats) -> np.ndarray:
        """Observation after ``stats``' interval (relative to the previous ``update``'s loss)."""
        t = min(max(float(stats.threshold), self.low), self.high)
        loss = stats.val_loss if math.isfinite(stats.val_loss) else (self._prev_loss or 0.0)
        ref = self._first_loss if self._first_loss is not None else loss
        loss = min(max(loss / ref, 0.0), LOSS_CLIP) if ref > 0 else 1.0
        obs = np.array([stats.progress, math.log10(1.0 - t), stats.reuse_ratio, loss,
                        self._rel_change(stats), stats.bytes_fraction], dtype=np.float64)
        return np.nan_to_num(obs).astype(np.float32)

    def reward(self, stats: IntervalStats) -> float:
        """``(1 - bytes_sent/bytes_full) - loss_weight * max(0, dL)`` (see the class docstring)."""
        return (1.0 - stats.bytes_fraction) - self.loss_weight * max(0.0, self._rel_change(stats))

    def noise_sigma(self) -> float:
        return max(self.noise_min, self.noise_std * self.noise_decay ** self.intervals)

    def greedy_action(self, obs: np.ndarray) -> float:
        """The policy's action in [-1, 1] for ``obs``, without exploration noise (no side effects)."""
        with self._private_rng():
            action, _ = self.agent.predict(np.asarray(obs, dtype=np.float32), deterministic=True)
        a = float(np.asarray(action).reshape(-1)[0])
        return a if math.isfinite(a) else 1.0  # a broken policy falls back to the conservative end

    def greedy_threshold(self, obs: np.ndarray) -> float:
        """The policy's threshold for ``obs`` without exploration noise (no side effects)."""
        return self.action_to_threshold(self.greedy_action(obs))

    # -- controller interface ---------------------------------------------------------------------------
    def initial(self) -> float:
        self.last_threshold = self._initial
        return self._initial

    def update(self, stats: IntervalStats) -> float:
        obs, r, done = self.observe(stats), self.reward(stats), stats.progress >= 1.0
        buf = self.agent.replay_buffer
        if self._prev_obs is not None:
            action = np.array([[self.threshold_to_action(stats.threshold)]], dtype=np.float32)
            buf.add(self._prev_obs[None], obs[None], action, np.array([r], dtype=np.float32),
                    np.array([done], dtype=np.float32), [{}])
            if buf.size() >= self.learning_starts and self.gradient_steps > 0:
                with self._private_rng():
                    self.agent.train(gradient_steps=self.gradient_steps, batch_size=self.batch_size)
        self.last_reward = r
        # a finished run ends the episode: the next update (a new run) starts without a transition
        self._prev_obs = None if done else obs
        finite = math.isfinite(stats.val_loss) and stats.val_loss > 0
        self._prev_loss = None if done else (stats.val_loss if finite else self._prev_loss)
        self._first_loss = None if done else (self._first_loss or (stats.val_loss if finite else None))
        a = self.greedy_action(obs) + float(self._noise_rng.normal(0.0, self.noise_sigma()))
        self.intervals += 1
        self.last_threshold = self.action_to_threshold(a)
        return self.last_threshold

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "algo": "DDPG", "format": 1, "low": self.low, "high": self.high,
                "obs_dim": OBS_DIM, "net_arch": self.net_arch, "loss_weight": self.loss_weight,
                "intervals": self.intervals, "transitions": int(self.agent.replay_buffer.size()),
                "noise_sigma": self.noise_sigma(), "last_threshold": self.last_threshold,
                "last_reward": self.last_reward}

    def save(self, path: str | os.PathLike) -> str:
        """Write the agent (``agent.save``) with controller state and replay buffer to exactly ``path``."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        buf = self.agent.replay_buffer
        n = buf.size()
        state = self.state_dict()
        state["buffer"] = {k: getattr(buf, k)[:n, 0].tolist()
                           for k in ("observations", "next_observations", "actions", "rewards", "dones")}
        self.agent.splitcom_state = state  # every non-excluded agent attribute goes into the zip's data
        try:
            # a file object stops SB3 from appending ".zip" or renaming when path is a folder
            with open(path, "wb") as f:
                self.agent.save(f)
        finally:
            del self.agent.splitcom_state
        return path

    # -- internals --------------------------------------------------------------------------------------
    @contextmanager
    def _private_rng(self) -> Iterator[None]:
        np_saved, torch_saved, threads = np.random.get_state(), torch.get_rng_state(), torch.get_num_threads()
        np.random.set_state(self._np_state)
        torch.set_rng_state(self._torch_state)
        torch.set_num_threads(1)  # the nets are tiny; extra threads only cost (badly, on a busy CPU)
        try:
            yield
        finally:
            self._np_state, self._torch_state = np.random.get_state(), torch.get_rng_state()
            np.random.set_state(np_saved)
            torch.set_rng_state(torch_saved)
            torch.set_num_threads(threads)

    def _load(self, path: str, env: Any, hyper: dict[str, Any]) -> Any:
        from stable_baselines3 import DDPG
        from stable_baselines3.td3.policies import TD3Policy

        if not os.path.isfile(path):
            raise UserError(f"no such file: {path}", where=LOAD_KEY)
        try:
            with open(path, "rb") as f:
                agent = DDPG.load(f, env=env, device="cpu", **hyper)
        except Exception as e:  # any failure here means "not a compatible SB3 DDPG zip"
            raise UserError(f"{path} is not a compatible SB3 DDPG checkpoint ({type(e).__name__}: {e})",
                            where=LOAD_KEY) from e
        state = getattr(agent, "splitcom_state", None)
        if not isinstance(agent.policy, TD3Policy) or not isinstance(state, dict) or state.get("algo") != "DDPG":
            raise UserError(f"{path} is not a SplitCom DDPG controller checkpoint", where=LOAD_KEY)
        saved = (state.get("low"), state.get("high"), state.get("net_arch"))
        if saved != (self.low, self.high, self.net_arch):
            raise UserError(f"{path} was saved with (low, high, net_arch) = {saved}, "
                            f"but this run uses {(self.low, self.high, self.net_arch)}", where=LOAD_KEY)
        del agent.splitcom_state
        self.intervals = int(state.get("intervals", 0))
        b = state.get("buffer", {})
        for row in zip(*(b.get(k, []) for k in ("observations", "next_observations", "actions", "rewards", "dones")),
                       strict=True):
            o, no, a, r, d = (np.asarray(x, dtype=np.float32) for x in row)
            agent.replay_buffer.add(o[None], no[None], a[None], r[None], d[None], [{}])
        return agent


def _spaces_env() -> Any:
    """A gymnasium Env that only carries the spaces.

    SB3 builds its networks and replay buffer from an env's observation/action spaces (and checks a
    loaded zip against them), so an env is needed to construct the agent. Transitions come from real
    training intervals via ``replay_buffer.add`` and ``learn()`` is never called, so it is never stepped.
    """
    import gymnasium as gym

    class _SpacesOnlyEnv(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            super().reset(seed=seed)
            return np.zeros(OBS_DIM, dtype=np.float32), {}

        def step(self, action):
            raise RuntimeError("the threshold controller's env only carries spaces; it is never stepped")

    return _SpacesOnlyEnv()
