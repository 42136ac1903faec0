"""splitcom audit: the attacks work, the capture is what the server decodes, the noise comes before codec and reuse."""

import json

import pytest
import torch
from conftest import tiny_cfg
from typer.testing import CliRunner

from splitcom.audit.capture import capture_act_up
from splitcom.audit.run import audit_run
from splitcom.cli import app
from splitcom.compress.codecs import get_codec
from splitcom.compress.noise import TokenNoise
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.models.split import unpad
from splitcom.protocol import serde
from splitcom.protocol.messages import Stream, TensorMsg
from splitcom.transport.counters import ByteCounter

runner = CliRunner()
CUT1 = {"split.cut_layer": 1, "train.epochs": 1, "data.max_train_samples": 24}


def _audit(tmp_path, name, **over):
    out = tmp_path / name
    run(tiny_cfg(**{**CUT1, **over}), out, progress=False)
    return audit_run(out, dev_samples=16, public_n=120, opt_samples=4, steps=30)


def test_learned_inverter_reads_cut1_and_large_noise_hides_it(tmp_path):
    clean = _audit(tmp_path, "clean")
    noisy = _audit(tmp_path, "noisy", **{"privacy.noise": 16})
    c, n = clean["streams"]["act_up"]["learned"], noisy["streams"]["act_up"]["learned"]
    assert clean["public"] == "synthetic" and clean["noise"] == 0 and noisy["noise"] == 16
    assert c["prompt"]["token_acc"] > 0.9 and c["completion"]["token_acc"] > 0.8  # the attack works
    assert c["prompt"]["rouge_l"] > 0.9
    assert n["prompt"]["token_acc"] < c["prompt"]["token_acc"] - 0.3
    assert n["prompt"]["rouge_l"] < c["prompt"]["rouge_l"] - 0.2
    opt = clean["streams"]["act_up"]["optimisation"]
    assert opt["samples"] == 4 and 0 <= opt["prompt"]["token_acc"] <= 1
    written = json.loads((tmp_path / "clean" / "audit.json").read_text())
    assert written["streams"]["act_up"]["learned"]["prompt"] == c["prompt"]


def _spy(server, cid=0):
    """Record the rows the server's act_up Incoming end decodes, and the bytes it receives."""
    seen, raw = [], []
    inc = server.inc[cid][Stream.act_up]
    decode, handle = inc.decode, server.handle_bytes

    def spy_decode(msg, sample_ids=None):
        rows = decode(msg, sample_ids)
        seen.append(rows)
        return rows

    def spy_handle(client_id, data):
        raw.append(data)
        return handle(client_id, data)

    inc.decode, server.handle_bytes = spy_decode, spy_handle
    return seen, raw


@pytest.mark.parametrize("over", [
    {"compression.codec": "int4", "privacy.noise": 0.5},
    {"compression.codec": "int8", "compression.prefix": "true", "compression.temporal.enabled": "true",
     "privacy.noise": 0.25, "privacy.clip": 5.0},
])
def test_capture_equals_what_the_server_decodes(over):
    cfg = tiny_cfg(**over)
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter())
    client = clients[0]
    batch = client.epoch_batches(1)[0]
    by_id = {x.sample_id: x for x in s.train}
    samples = [by_id[i] for i in batch.sample_ids]
    cap = capture_act_up(cfg, s.split, samples, client.cut, s.pad_id, passes=1, batch_size=len(samples))
    seen, _ = _spy(server)
    client.train_step(batch, 0)
    assert len(seen) == 1 and len(seen[0]) == len(cap.rows)
    for got, want in zip(seen[0], cap.rows, strict=True):
        assert torch.equal(got, want)


def test_noise_is_in_the_bytes_before_the_codec():
    """The act_up payload is the codec of the noisy rows: what the codec coded was already noisy."""
    cfg = tiny_cfg(**{"compression.codec": "int8", "privacy.noise": 1.0})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter())
    batch = clients[0].epoch_batches(1)[0]
    with torch.no_grad():
        clean = unpad(s.split.head(batch.input_ids, batch.lengths, clients[0].cut), batch.lengths)
    _, raw = _spy(server)
    clients[0].train_step(batch, 0)
    msg = next(m for m in map(serde.decode, raw) if isinstance(m, TensorMsg) and m.stream == Stream.act_up)
    noise, int8 = TokenNoise(1.0, None, cfg.train.seed, 0), get_codec("int8")
    for sample, row in zip(msg.samples, clean, strict=True):
        assert sample.payload == int8.encode(noise.apply(row))
        assert sample.payload != int8.encode(row)


@pytest.mark.parametrize("noise,reused", [(0.0, True), (1.0, False)])
def test_reuse_decides_on_the_noisy_tensor(noise, reused):
    """The same batch twice with (nearly) unchanged adapters: without noise the second act_up is all REUSE;
    with noise the summaries of two noisy copies differ, so the samples go FULL again (and bytes show it)."""
    cfg = tiny_cfg(**{"compression.temporal.enabled": "true", "compression.temporal.threshold": 0.999,
                      "privacy.noise": noise, "train.lr": 1e-12})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter())
    batch = clients[0].epoch_batches(1)[0]
    _, raw = _spy(server)
    clients[0].train_step(batch, 0)
    clients[0].train_step(batch, 1)
    ups = [m for m in map(serde.decode, raw) if isinstance(m, TensorMsg) and m.stream == Stream.act_up]
    assert len(ups) == 2 and not any(x.reuse for x in ups[0].samples)
    assert all(x.reuse for x in ups[1].samples) is reused
    assert (len(serde.encode(ups[1])) < len(serde.encode(ups[0])) / 10) is reused


def test_ushape_audit_reads_act_down_too(tmp_path):
    res = _audit(tmp_path, "u", **{"split.mode": "ushape", "split.tail_layers": 1})
    assert res["tail_start"] == 3 and set(res["streams"]) == {"act_up", "act_down"}
    down = res["streams"]["act_down"]["learned"]["completion"]
    assert down["tokens"] > 0 and 0 <= down["token_acc"] <= 1
    report = runner.invoke(app, ["report", str(tmp_path / "u")])
    assert report.exit_code == 0, report.output
    md = (tmp_path / "u" / "report" / "report.md").read_text()
    assert "audit act_down completion" in md and "audit act_up prompt" in md


def _err(result) -> str:
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


@pytest.mark.parametrize("value", ["-0.5", "nan", ".nan", "inf"])
def test_bad_noise_exits_2_naming_the_key(tmp_path, value):
    text = _err(runner.invoke(app, ["run", "--set", "model.name=tiny-llama", "--set", f"privacy.noise={value}",
                                    "--no-progress", "--out", str(tmp_path)]))
    assert "privacy.noise" in text


def test_audit_refuses_what_is_not_an_sfl_run(tmp_path):
    assert "not a run directory" in _err(runner.invoke(app, ["audit", str(tmp_path)]))
    assert "not found" in _err(runner.invoke(app, ["audit", str(tmp_path / "missing")]))
    out = tmp_path / "central"
    run(tiny_cfg(**{"federation.mode": "centralized", "train.epochs": 1}), out, progress=False)
    assert "centralized" in _err(runner.invoke(app, ["audit", str(out)]))
    fl = tmp_path / "fl"
    run(tiny_cfg(**{"federation.mode": "fl", "train.epochs": 1}), fl, progress=False)
    assert "only adapters cross the wire" in _err(runner.invoke(app, ["audit", str(fl)]))
