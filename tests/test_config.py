from pathlib import Path

import pytest

from splitcom.config import build_config, dump_config, load_config
from splitcom.errors import UserError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert build_config(cfg.model_dump(mode="json")) == cfg


def test_public_keys_and_overrides():
    cfg = build_config({}, ["model.name=tiny-gpt2", "model.lora.rank=4", "split.cut_layer=3",
                            "data.dataset=e2e:/x", "data.max_train_samples=10", "data.max_eval_samples=5",
                            "data.partition.scheme=dirichlet", "data.partition.alpha=0.3",
                            "federation.mode=centralized", "federation.num_clients=5",
                            "federation.aggregate_every=7", "federation.server_adapters=shared",
                            "train.epochs=3", "train.batch_size=2", "train.lr=0.01", "train.seed=9",
                            "compression.codec=int8"])
    assert (cfg.model.lora.rank, cfg.split.cut_layer, cfg.federation.aggregate_every) == (4, 3, 7)
    assert cfg.compression.codec == "int8" and cfg.data.partition.alpha == 0.3


def test_dump_round_trips(tmp_path):
    cfg = build_config({}, ["train.epochs=5"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("override,key", [
    ("model.nme=x", "model.nme"),
    ("train.epochs=many", "train.epochs"),
    ("federation.aggregate_every=0", "federation.aggregate_every"),
    ("compression.codec=int3", "compression.codec"),
    ("bogus=1", "bogus"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(UserError) as e:
        build_config({}, [override])
    assert str(e.value).startswith(key)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d"):
        load_config(p)


def test_data_seed_fixes_the_data_across_training_seeds():
    from splitcom.federation.setup import prepare
    from tests.conftest import tiny_cfg

    a, b, c = (prepare(tiny_cfg(**over)) for over in ({}, {"train.seed": 1, "data.seed": 0}, {"train.seed": 1}))
    ids = lambda s: ([x.ids for x in s.train], [x.ids for x in s.val], s.partitions)  # noqa: E731
    assert ids(a) == ids(b)  # the same samples, dev set and clients
    assert ids(a) != ids(c)  # train.seed alone draws other data too
