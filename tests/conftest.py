import importlib.util
import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
E2E_DIR = SHARED / "data" / "e2e"
requires_e2e = pytest.mark.skipif(not (E2E_DIR / "trainset.csv").is_file(),
                                  reason=f"real E2E data not found at {E2E_DIR} (../shared is absent)")


@pytest.fixture(scope="session", autouse=True)
def _quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_module(name: str):
    """bench/NAME.py as a module: the bench scripts are not part of the package."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_comm():
    """bench/comm.py as a module (its ROWS, fork rules)."""
    return bench_module("comm")


def tiny_cfg(**over):
    """A seconds-long config; ``over`` maps dotted keys to values."""
    from splitcom.config import build_config

    base = {
        "model.name": "tiny-llama", "split.cut_layer": 2, "data.dataset": "synthetic",
        "data.max_train_samples": 48, "data.max_eval_samples": 16, "data.max_length": 48,
        "federation.num_clients": 3, "train.epochs": 2, "train.batch_size": 8, "train.lr": 0.003,
        "logging.progress": False,
    }
    base.update(over)
    return build_config({}, [f"{k}={v}" for k, v in base.items()])


def train_round(clients, round_=0):
    """One step of every client (first batch of epoch 1), then every client uploads its adapter."""
    for step, c in enumerate(clients):
        c.train_step(c.epoch_batches(1)[0], step)
    for c in clients:
        c.push_adapters(round_)
