"""A deployed SFL client holds only the blocks it may run (models/hold.py): a prefix load gives the whole
model's blocks bit for bit, dropped blocks are freed and fail loudly, and a deployment whose clients hold
only their blocks ends as `splitcom run` ends."""

import gc
import logging
import weakref

import pytest
import torch
from conftest import tiny_cfg
from test_deploy import PROC_TIMEOUT, TOKENS, Thread, _adapters_equal, _inproc_server, _setup, _sim
from transformers import AutoModelForCausalLM

from splitcom.deploy.client import ClientDriver, ClientOptions
from splitcom.deploy.plan import client_blocks
from splitcom.models.hold import BlockNotHeld, Dropped, held_blocks, hold_only
from splitcom.models.load import _tiny_config, load_model
from splitcom.models.split import SplitModel, layer_index


def _kept_params(model, blocks):
    """Parameters of a whole model outside the decoder blocks, plus those of ``blocks`` (by name)."""
    return sum(p.numel() for n, p in model.named_parameters() if layer_index(n) is None or layer_index(n) in blocks)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_prefix_load_gives_the_whole_models_first_blocks(tmp_path, name, caplog):
    """A checkpoint loaded with ``blocks`` = 2 holds blocks 0, 1 (the same numbers as the whole model's) and
    placeholders for 2, 3; it still counts 4 blocks, and its head up to the cut equals the whole model's."""
    whole, tok = load_model(name)
    whole.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen = []
    caplog.clear()  # (saving warns about tensor parallelism)
    with caplog.at_level(logging.WARNING):
        part, _ = load_model(str(tmp_path / "m"), blocks=lambda config: seen.append(config.num_hidden_layers) or 2)
    assert seen == [4] and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    sp, sw = SplitModel(part), SplitModel(whole)
    assert sp.num_layers == 4 and part.config.num_hidden_layers == 4 and held_blocks(part) == [0, 1]
    assert sum(p.numel() for p in part.parameters()) == _kept_params(whole, {0, 1}) < \
        sum(p.numel() for p in whole.parameters())
    ids, lengths = torch.randint(0, len(tok), (3, 10), generator=torch.Generator().manual_seed(0)), [10, 7, 4]
    with torch.no_grad():
        assert torch.equal(sp.head(ids, lengths, 2), sw.head(ids, lengths, 2))
        with pytest.raises(BlockNotHeld, match="decoder block 2 is not held"):
            sp.run(sw.head(ids, lengths, 2), lengths, 2, 3)


def test_dropped_blocks_are_freed_and_an_untied_head_goes():
    """hold_only frees what it drops (no reference is left to a dropped block's weight); an LM head tied to
    the embedding stays, an untied one goes unless the client runs it (U-shape)."""
    for tied in (True, False):
        config = _tiny_config("llama", 64, 0, 0)
        config.tie_word_embeddings = tied
        for head in (True, False):
            model = AutoModelForCausalLM.from_config(config)
            ref, total = weakref.ref(model.model.layers[2].mlp.up_proj.weight), _kept_params(model, {0, 3})
            hold_only(model, [0, 3], head=head)
            gc.collect()
            assert ref() is None and held_blocks(model) == [0, 3] and isinstance(model.model.layers[1], Dropped)
            dropped_head = not tied and not head
            assert isinstance(model.lm_head, Dropped) == dropped_head
            assert sum(p.numel() for p in model.parameters()) == total - (64 * 64 if dropped_head else 0)


def test_a_client_holds_every_block_of_every_cut_it_may_take():
    """Fixed cut 2: blocks 0, 1; U-shape cut 1 with one tail block: 0 and 3; adaptive (cut 2 on a default
    device, which holds any cut, while the server keeps one block): 0-2, as the server may move it one
    deeper; federated LoRA: all."""
    config = _tiny_config("llama", 64, 0, 0)
    assert client_blocks(tiny_cfg(), config, 1) == [0, 1]
    assert client_blocks(tiny_cfg(**{"split.mode": "ushape", "split.cut_layer": 1, "split.tail_layers": 1}),
                         config, 1) == [0, 3]
    assert client_blocks(tiny_cfg(**{"split.cut_policy": "adaptive"}), config, 1) == [0, 1, 2]
    assert client_blocks(tiny_cfg(**{"federation.mode": "fl"}), config, 1) is None


@pytest.mark.parametrize("over,blocks", [({}, [0, 1]), ({"split": {"mode": "ushape", "cut_layer": 1,
                                                                   "tail_layers": 1}}, [0, 3])])
def test_deployed_clients_hold_only_their_blocks(tmp_path, over, blocks):
    """Three clients over gRPC loopback (threads of this process, each with its own model): each holds the
    embedding and its blocks (cut 2; U-shape: cut 1 and the tail block 3, the final norm and the tied LM
    head), placeholders for the rest, and the run's adapters and losses equal `splitcom run`'s bit for bit."""
    tree = _setup(tmp_path)
    for key, value in over.items():
        tree[key].update(value)
    address, server = _inproc_server(tree, tmp_path / "deploy")
    drivers = [ClientDriver(ClientOptions(address, cid, TOKENS[cid], reconnect_s=PROC_TIMEOUT)) for cid in range(3)]
    threads = [Thread(d.run) for d in drivers]
    dep = server.join()
    assert [t.join()["rejected_steps"] for t in threads] == [0, 0, 0]
    whole, _ = load_model("tiny-llama")
    for d in drivers:
        model = d.sc.split.model
        assert held_blocks(model) == blocks and d.sc.split.num_layers == 4
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert sum(p.numel() for p in model.parameters()) - lora == _kept_params(whole, set(blocks))
        assert {layer_index(k) for k in d.sc.bank.state(d.sc.adapter, d.sc.layers)} == set(blocks)
    sim = _sim(tree, tmp_path / "sim")
    assert _adapters_equal(tmp_path / "deploy", tmp_path / "sim")
    for key in ("val_loss_by_epoch", "train_loss_by_epoch", "bytes_by_stream"):
        assert dep[key] == sim[key], key
