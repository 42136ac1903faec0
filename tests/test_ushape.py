"""U-shape: exact against the unsplit model, labels never reach the server, reuse on all four streams."""

import pytest
import torch
from conftest import tiny_cfg

from splitcom.errors import UserError
from splitcom.federation.centralized import CentralizedTrainer
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.models.adapters import GLOBAL
from splitcom.models.load import load_model
from splitcom.models.split import SplitModel
from splitcom.protocol import serde
from splitcom.protocol.messages import AdapterMsg, ControlMsg, LabelsMsg, Stream, TensorMsg
from splitcom.transport.counters import ByteCounter

U = {"split.mode": "ushape", "split.cut_layer": 1, "split.tail_layers": 1}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_head_body_tail_logits_match_unsplit(name):
    model, tok = load_model(name)
    model.eval()
    split = SplitModel(model)
    lengths = [6, 10, 2]
    ids = torch.randint(0, len(tok), (3, 10), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(10)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        for k1, k2 in [(1, 3), (1, 2), (2, 3)]:
            h = split.run(split.run(split.embed(ids), lengths, 0, k1), lengths, k1, k2)
            out = split.logits(split.run(h, lengths, k2, split.num_layers))
            for i, n in enumerate(lengths):
                torch.testing.assert_close(out[i, :n], ref[i, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_one_client_ushape_equals_centralized(name):
    """Four streams in fp32: losses and every LoRA matrix match plain PEFT training (within 1e-5)."""
    cfg = tiny_cfg(**U, **{"model.name": name, "federation.num_clients": 1})
    a, b = prepare(cfg), prepare(cfg)
    server, (client,) = build_sfl(a, ByteCounter())
    central = CentralizedTrainer(b.split.model, b.bank, b.train, lr=cfg.train.lr, batch_size=cfg.train.batch_size,
                                 pad_id=b.pad_id)
    for step, batch in enumerate(client.epoch_batches(1)[:3]):
        assert abs(client.train_step(batch, step) - central.train_step(batch, step)) < 1e-5
    got = a.bank.state("c0", client.layers)
    got.update(a.bank.state(server.body_adapter(0), server.server_layers(0)))
    ref = b.bank.state(GLOBAL)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0)


def test_server_never_receives_token_ids_or_labels(tmp_path, monkeypatch):
    from splitcom.federation import server as server_mod

    seen = []
    original = server_mod.SplitServer.handle_bytes

    def spy(self, client_id, data):
        seen.append(serde.decode(data))
        return original(self, client_id, data)

    monkeypatch.setattr(server_mod.SplitServer, "handle_bytes", spy)
    summary = run(tiny_cfg(**U), tmp_path, progress=False)
    assert seen and summary["val_loss"] < summary["initial_val_loss"]
    kinds = {type(m) for m in seen}
    assert LabelsMsg not in kinds
    tensors = [m for m in seen if isinstance(m, TensorMsg)]
    assert {m.stream for m in tensors} == {Stream.act_up, Stream.grad_up}
    for m in tensors:  # every payload is a float tensor [T_i, H]: no integer ids anywhere
        assert m.hidden == summary["hidden_size"]
        assert all(len(s.payload) == s.length * m.hidden * 4 for s in m.samples)
    for m in seen:
        if isinstance(m, ControlMsg):
            assert set(m.body) <= {"num_samples"}
        if isinstance(m, AdapterMsg):
            assert all("lora_" in k for k in m.tensors)
    assert set(summary["bytes_by_stream"]) >= {"act_up", "act_down", "grad_up", "grad_down"}
    assert "labels_up" not in summary["bytes_by_stream"]


def test_server_rejects_labels_in_ushape():
    s = prepare(tiny_cfg(**U))
    server, _ = build_sfl(s, ByteCounter())
    reply = serde.decode(server.handle_bytes(0, serde.encode(LabelsMsg(0, 0, {1: [1, 2]}))))
    assert reply.kind == "error" and "U-shape" in reply.body["message"]


@pytest.mark.parametrize("over", [{"split.cut_layer": 2, "split.tail_layers": 2},
                                  {"split.cut_layer": 3, "split.tail_layers": 1}])
def test_tail_overlap_is_user_error_naming_both_keys(tmp_path, over):
    with pytest.raises(UserError, match="split.cut_layer, split.tail_layers"):
        run(tiny_cfg(**{**U, **over}), tmp_path, progress=False)


def test_reuse_on_all_four_streams(tmp_path):
    streams = "[act_up,act_down,grad_up,grad_down]"
    over = {**U, "compression.temporal.enabled": True, "compression.temporal.threshold": -1.0,
            "compression.temporal.streams": streams}
    s = run(tiny_cfg(**over), tmp_path / "t", progress=False)
    base = run(tiny_cfg(**U), tmp_path / "b", progress=False)
    assert s["reuse_ratio_by_stream"] == {k: 0.5 for k in ("act_down", "act_up", "grad_down", "grad_up")}
    for stream in ("act_up", "act_down", "grad_up", "grad_down"):
        assert s["bytes_by_stream"][stream] < 0.51 * base["bytes_by_stream"][stream]
    assert s["server_cache_bytes"] > 0 and s["client_cache_bytes"] > 0
