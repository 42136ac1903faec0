"""Compression past the first epoch: residual refresh (DELTA), shared prompt prefixes, the zstd stage and
per-stream thresholds."""

import random

import pytest
import torch
from conftest import tiny_cfg

from splitcom.compress.pipeline import Incoming, Outgoing
from splitcom.compress.prefix import common_prefix, prefix_key
from splitcom.config import build_config
from splitcom.errors import ProtocolError, UserError
from splitcom.federation.reuse import ReuseControl
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.protocol import serde
from splitcom.protocol.messages import (
    AdapterMsg,
    ControlMsg,
    LabelsMsg,
    PrefixRef,
    SampleTensor,
    Stream,
    TensorMsg,
)
from splitcom.transport.counters import ByteCounter

H = 16


def _pair(refresh="delta", delta_codec="int4", prefix=False, threshold=0.9):
    """``prefix``: False, True, or "refresh" (shared prefixes in DELTA refreshes too)."""
    out = Outgoing(Stream.act_up, "int8", H, reuse=True, projection_dim=4, seed=3, threshold=threshold,
                   refresh=refresh, delta_codec=delta_codec, prefix=bool(prefix), prefix_refresh=prefix == "refresh")
    inc = Incoming(Stream.act_up, H, reuse=True, prefix=bool(prefix))
    return out, inc


@pytest.mark.parametrize("delta_codec", ["sign1", "int2o", "int2", "int4", "int8", "fp32"])
@pytest.mark.parametrize("prefix", [False, True, "refresh"])
def test_mirror_equals_receiver_bit_for_bit(delta_codec, prefix):
    """Random sequences of drift: every sample goes FULL, REUSE or DELTA (and PREFIX with prefix
    sharing, and DELTA after a PREFIX with prefix_refresh), through serde; after each message the sender's
    mirror is the receiver's tensor, bit for bit, and so are the registered prefixes."""
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    out, inc = _pair(delta_codec=delta_codec, prefix=prefix)
    lengths = {sid: rng.randint(3, 9) for sid in range(6)}
    prompts = {sid: tuple([1, 2, 3, 4][: rng.randint(1, 4)] + [sid]) for sid in range(6)}
    x = {sid: torch.randn(n, H, generator=g) for sid, n in lengths.items()}
    kinds = set()
    for step in range(30):
        sids = rng.sample(range(6), 3)
        for sid in sids:  # drift: small (REUSE), medium (DELTA) or a new length (FULL)
            if rng.random() < 0.1:
                lengths[sid] = rng.randint(3, 9)
                x[sid] = torch.randn(lengths[sid], H, generator=g)
            else:
                x[sid] = x[sid] + rng.choice([0.01, 0.5, 2.0]) * torch.randn(x[sid].shape, generator=g)
        msg = out.message(0, step, sids, [x[s] for s in sids], tokens=[prompts[s] for s in sids] if prefix else None)
        kinds |= {"reuse" if s.reuse else ("prefix-delta" if s.delta and s.prefix and s.prefix.ref_len else "delta")
                  if s.delta else "prefix" if s.prefix else "full" for s in msg.samples}
        rows = inc.decode(serde.decode(serde.encode(msg)))
        for sid, row in zip(sids, rows, strict=True):
            assert torch.equal(out.mirror.get(sid, lengths[sid]), row)
            assert torch.equal(inc.receiver.get(sid, lengths[sid]), row)
    assert {"reuse", "delta", "prefix" if prefix else "full"} <= kinds
    assert ("prefix-delta" in kinds) == (prefix == "refresh")
    if prefix:
        for key, entry in out.prefix.entries.items():
            assert torch.equal(entry.held, inc.prefixes.rows[key])


def test_sign1_deltas_feed_their_error_back():
    """sign1 DELTAs against the exact mirror are error feedback: each refresh codes what the receiver still
    lacks, so the receiver's error of a tensor that stays put shrinks at every DELTA."""
    g = torch.Generator().manual_seed(2)
    out, inc = _pair(delta_codec="sign1", threshold=2.0)  # above any cosine: never REUSE
    x = torch.randn(8, H, generator=g)
    inc.decode(out.message(0, 0, [1], [torch.zeros(8, H)]))  # the receiver holds zeros
    errors = []
    for step in range(1, 9):
        msg = out.message(0, step, [1], [x])
        assert msg.samples[0].delta and len(msg.samples[0].payload) == 8 * 4 + 8 * H // 8
        errors.append(float((inc.decode(msg)[0] - x).norm()))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.35 * errors[0], errors


def test_delta_is_closer_than_its_codec_alone():
    """A DELTA codes the residual, so the receiver's error is that of int4 on a small residual."""
    g = torch.Generator().manual_seed(1)
    out, inc = _pair(threshold=1.0)
    x = torch.randn(8, H, generator=g)
    inc.decode(out.message(0, 0, [1], [x]))
    y = x + 0.05 * torch.randn(8, H, generator=g)
    msg = out.message(0, 1, [1], [y])
    assert msg.samples[0].delta and len(msg.samples[0].payload) == 8 * (H // 2 + 4)
    got = inc.decode(msg)[0]
    from splitcom.compress.codecs import get_codec
    int4 = get_codec("int4")
    alone = int4.decode(int4.encode(y), 8, H)
    assert (got - y).norm() < 0.2 * (alone - y).norm()


def test_delta_for_an_unknown_id_or_without_reuse_is_a_protocol_error():
    _, inc = _pair()
    msg = TensorMsg(Stream.act_up, 0, 0, "int8", H, [SampleTensor(42, 3, bytes(3 * (H // 2 + 4)), delta=True)],
                    delta_codec="int4")
    with pytest.raises(ProtocolError, match="DELTA for sample id 42") as err:
        inc.decode(serde.decode(serde.encode(msg)))
    assert err.value.field == "samples[0].sample_id"
    with pytest.raises(ProtocolError, match="temporal reuse is off"):
        Incoming(Stream.act_up, H).decode(msg)


def test_prefix_keys_equal_only_for_equal_token_prefixes():
    assert prefix_key((1, 2, 3)) == prefix_key([1, 2, 3])
    keys = {prefix_key(t) for t in [(1, 2, 3), (1, 2), (1, 2, 3, 0), (3, 2, 1), (12, 3), (1, 23), ()]}
    assert len(keys) == 7 and 0 not in keys
    assert common_prefix((1, 2, 3, 4), (1, 2, 5)) == 2 and common_prefix((), (1,)) == 0


def test_prefix_rows_are_sent_once_within_a_batch():
    """Three samples with one prompt and different completions: the first registers the prompt, the
    others send only their completion rows; a fourth shares the first two tokens only."""
    g = torch.Generator().manual_seed(2)
    out = Outgoing(Stream.act_up, "fp32", H, prefix=True)
    inc = Incoming(Stream.act_up, H, prefix=True)
    prompt = torch.randn(5, H, generator=g)
    rows = [torch.cat([prompt, torch.randn(k, H, generator=g)]) for k in (2, 3, 4)]
    rows.append(torch.cat([prompt[:2], torch.randn(4, H, generator=g)]))
    tokens = [(7, 8, 9, 10, 11)] * 3 + [(7, 8, 1, 1)]
    msg = out.message(0, 0, [0, 1, 2, 3], rows, tokens=tokens)
    p = [s.prefix for s in msg.samples]
    assert p[0] == PrefixRef(0, 0, prefix_key(tokens[0]), 5)
    assert p[1] == p[2] == PrefixRef(prefix_key(tokens[0]), 5, 0, 0)
    assert p[3] == PrefixRef(prefix_key(tokens[0]), 2, prefix_key(tokens[3]), 4)
    assert [len(s.payload) for s in msg.samples] == [4 * H * n for n in (7, 3, 4, 4)]
    data = serde.encode(msg)
    assert len(data) == 32 + sum(17 + 24 + len(s.payload) for s in msg.samples)
    got = inc.decode(serde.decode(data))
    assert all(torch.equal(a, b) for a, b in zip(got, rows, strict=True))
    assert out.prefix_bytes_saved == 4 * H * (5 + 5 + 2) - 4 * 24
    # a later batch: the same prompt, an unchanged activation, is referenced (summary test passes)...
    out.threshold = 0.99
    again = out.message(0, 1, [4], [torch.cat([prompt, torch.randn(1, H, generator=g)])], tokens=[tokens[0]])
    assert again.samples[0].prefix.ref_len == 5
    # ...a drifted one registers the prompt afresh
    moved = out.message(0, 2, [5], [torch.randn(6, H, generator=g)], tokens=[tokens[0]])
    assert moved.samples[0].prefix == PrefixRef(0, 0, prefix_key(tokens[0]), 5)


def test_refreshes_share_the_prompt_with_prefix_refresh():
    """Three samples with one prompt, all drifted since their first sight: with prefix_refresh the first
    refreshes its whole tensor and registers its prompt; the others code the change of their completion
    rows only and take the refreshed prompt rows by key. The receiver ends exactly where the sender's
    mirror says, as close to the new tensors as plain DELTAs get it; the bytes saved are the prompts'."""
    g = torch.Generator().manual_seed(4)
    prompt, ends = torch.randn(5, H, generator=g), [torch.randn(k, H, generator=g) for k in (2, 3, 4)]
    tokens = [(7, 8, 9, 10, 11)] * 3
    first = [torch.cat([prompt, e]) for e in ends]
    drift = 0.3 * torch.randn(5, H, generator=g)  # the prompt moved alike in all three (same forward pass)
    later = [torch.cat([prompt + drift, e + 0.3 * torch.randn(e.shape, generator=g)]) for e in ends]
    sizes = {}
    for mode in (True, "refresh"):
        out, inc = _pair(prefix=mode, threshold=2.0)  # above any cosine: never REUSE
        inc.decode(serde.decode(serde.encode(out.message(0, 0, [0, 1, 2], first, tokens=tokens))))
        msg = out.message(0, 1, [0, 1, 2], later, tokens=tokens)
        assert all(s.delta for s in msg.samples)
        got = inc.decode(serde.decode(serde.encode(msg)))
        for sid, row in enumerate(got):
            assert torch.equal(out.mirror.get(sid, row.shape[0]), row)
            assert (row - later[sid]).abs().max() < 0.1
        sizes[mode] = [len(s.payload) for s in msg.samples]
        if mode == "refresh":
            key = prefix_key(tokens[0])
            assert [s.prefix for s in msg.samples] == [PrefixRef(0, 0, key, 5), PrefixRef(key, 5, 0, 0),
                                                       PrefixRef(key, 5, 0, 0)]
            assert torch.equal(got[1][:5], got[0][:5]) and torch.equal(inc.prefixes.rows[key], got[0][:5])
            assert torch.equal(out.prefix.entries[key].held, got[0][:5])
    rows = lambda n: n * (H // 2 + 4)  # noqa: E731  int4: H/2 bytes and a 4-byte scale per row
    assert sizes[True] == [rows(7), rows(8), rows(9)]
    assert sizes["refresh"] == [rows(7), rows(3), rows(4)]


def test_a_prefixed_delta_needs_the_held_copy_and_the_key():
    """DELTA after a PREFIX: an unknown sample id or key, or prefix sharing off, is a ProtocolError naming
    the field; a payload that does not cover the rows after the prefix is refused by serde."""
    out, inc = _pair(prefix="refresh")
    inc.decode(out.message(0, 0, [1], [torch.ones(4, H)], tokens=[(1, 2)]))
    bad_key = TensorMsg(Stream.act_up, 0, 1, "int8", H, [SampleTensor(1, 4, bytes(2 * (H // 2 + 4)), delta=True,
                                                                       prefix=PrefixRef(99, 2, 0, 0))], delta_codec="int4")
    with pytest.raises(ProtocolError, match="never registered") as err:
        inc.decode(serde.decode(serde.encode(bad_key)))
    assert err.value.field == "samples[0].prefix.ref_key"
    unknown = TensorMsg(Stream.act_up, 0, 1, "int8", H, [SampleTensor(5, 4, bytes(2 * (H // 2 + 4)), delta=True,
                                                                       prefix=PrefixRef(prefix_key((1, 2)), 2, 0, 0))],
                        delta_codec="int4")
    with pytest.raises(ProtocolError, match="DELTA for sample id 5") as err:
        inc.decode(serde.decode(serde.encode(unknown)))
    assert err.value.field == "samples[0].sample_id"
    with pytest.raises(ProtocolError, match="prefix sharing is off"):
        Incoming(Stream.act_up, H, reuse=True).decode(bad_key)
    short = TensorMsg(Stream.act_up, 0, 1, "int8", H, [SampleTensor(1, 4, bytes(4 * (H // 2 + 4)), delta=True,
                                                                     prefix=PrefixRef(99, 2, 0, 0))], delta_codec="int4")
    with pytest.raises(ProtocolError, match="payload_len") as err:
        serde.decode(serde.encode(short))
    assert err.value.field == "samples[0].payload_len"


def test_prefix_reference_to_an_unknown_key_is_a_protocol_error():
    inc = Incoming(Stream.act_up, H, prefix=True)
    msg = TensorMsg(Stream.act_up, 0, 0, "fp32", H, [SampleTensor(1, 3, bytes(4 * H), prefix=PrefixRef(99, 2, 0, 0))])
    with pytest.raises(ProtocolError, match="never registered") as err:
        inc.decode(serde.decode(serde.encode(msg)))
    assert err.value.field == "samples[0].prefix.ref_key"
    wrong = TensorMsg(Stream.act_up, 0, 0, "fp32", H, [SampleTensor(1, 3, bytes(4 * H * 3),  # rows 0..2, not 2..2
                                                                     prefix=PrefixRef(99, 2, 0, 0))])
    with pytest.raises(ProtocolError, match="payload_len") as err:
        serde.decode(serde.encode(wrong))
    assert err.value.field == "samples[0].payload_len"


@pytest.mark.parametrize("make", [
    lambda e: TensorMsg(Stream.grad_down, 3, 9, "int8", H, [SampleTensor(1, 4, bytes(4 * (H + 4))),
                                                           SampleTensor(2, 4, None)], 1.5, "int4", e),
    lambda e: LabelsMsg(1, 2, {5: [-100, -100, 3, 4] * 20, 6: [1]}, e),
    lambda e: AdapterMsg(Stream.adapters_up, 1, 2, 3.0, {"a": torch.zeros(8, 64), "b": torch.ones(64, 8)}, 2,
                         "int8", e),
])
def test_entropy_round_trip_and_counted_bytes_are_wire_bytes(make):
    plain, packed = serde.encode(make("none")), serde.encode(make("zstd"))
    assert len(packed) < len(plain)
    back = serde.decode(packed)
    assert back.entropy == "zstd" and serde.encode(back) == packed
    assert serde.encode(serde.decode(plain)) == plain


def test_counters_count_the_compressed_bytes(tmp_path):
    """Every byte a run counts is a byte of a message as sent: wrap the channel and compare."""
    cfg = tiny_cfg(**{"compression.entropy": "zstd", "compression.prefix": True, "train.epochs": 1,
                      "compression.temporal.enabled": True, "compression.temporal.refresh": "delta"})
    s = prepare(cfg)
    counter = ByteCounter()
    server, clients = build_sfl(s, counter)
    sent = {"up": 0, "down": 0}
    orig_handle = server.handle_bytes

    def handle(cid, data):
        sent["up"] += len(data)
        reply = orig_handle(cid, data)
        sent["down"] += len(reply or b"")
        return reply

    server.handle_bytes = handle
    for c in clients:
        c.join()
        for step, b in enumerate(c.epoch_batches(1)):
            c.train_step(b, step)
        c.push_adapters(0)
    snap = counter.snapshot()
    assert (snap["bytes_up"], snap["bytes_down"]) == (sent["up"], sent["down"]) and sent["up"] > 0


def test_corrupt_zstd_frame_is_refused_and_the_server_goes_on():
    cfg = tiny_cfg(**{"compression.entropy": "zstd", "federation.num_clients": 2})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter())
    for c in clients:
        c.join()
    batch = clients[1].epoch_batches(1)[0]
    before = {k: v.clone() for k, v in s.bank.state("c1").items()}
    data = bytearray(serde.encode(LabelsMsg(1, 0, {sid: [1, 2, 3] for sid in batch.sample_ids}, "zstd")))
    data[-6] ^= 0xFF  # inside the frame: the checksum no longer matches
    reply = serde.decode(server.handle_bytes(1, bytes(data)))
    assert isinstance(reply, ControlMsg) and reply.kind == "error" and reply.body["field"] == "payload.zstd"
    assert all(torch.equal(v, s.bank.state("c1")[k]) for k, v in before.items())
    assert torch.isfinite(torch.tensor(clients[0].train_step(clients[0].epoch_batches(1)[0], 0)))


def test_per_stream_codecs_apply_and_train(tmp_path):
    """FULL codecs by stream: act_down's massive channels get int8o while act_up stays int8; a gradient stream
    the map does not name stays fp32. A U-shape run with them trains and counts each stream's codec bytes."""
    cfg = tiny_cfg(**{"split.mode": "ushape", "compression.codec": "{act_up: int8, act_down: int8o}",
                      "compression.grad_codec": "{grad_up: int4o}"})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter())
    assert {st.name: e.codec.name for st, e in clients[0].out.items()} == {"act_up": "int8", "grad_up": "int4o"}
    assert {st.name: e.codec.name for st, e in server.out[0].items()} == {"grad_down": "fp32", "act_down": "int8o"}
    from splitcom.federation.simulation import run

    summary = run(cfg, tmp_path / "run", progress=False)
    plain = run(tiny_cfg(**{"split.mode": "ushape"}), tmp_path / "plain", progress=False)
    assert summary["val_loss"] < summary["initial_val_loss"]
    by, ref = summary["bytes_by_stream"], plain["bytes_by_stream"]
    assert by["grad_down"] == ref["grad_down"] and by["act_up"] < 0.3 * ref["act_up"]
    # int8o: int8 plus 4 exact values (6 bytes each) a token, a large share at this tiny hidden size
    assert by["act_up"] < by["act_down"] < 0.5 * ref["act_down"]


def test_per_stream_thresholds_parse_and_apply():
    t = "compression.temporal"
    cfg = tiny_cfg(**{"split.mode": "ushape", f"{t}.enabled": True, f"{t}.threshold": "{act_up: 0.9, grad_up: 0.5}",
                      f"{t}.streams": "[act_up,act_down,grad_up,grad_down]", f"{t}.refresh": "delta",
                      f"{t}.delta_codec": "{act_down: int2, grad_up: fp32}"})
    assert cfg.compression.temporal.threshold_of("act_up") == 0.9 and cfg.compression.temporal.threshold_of(
        "act_down") == 0.999
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter())
    reuse = ReuseControl(cfg.compression.temporal, clients, s.split.hidden_size, 2, 0, server)
    reuse.begin_epoch({})
    assert {st.name: e.threshold for st, e in clients[0].out.items()} == {"act_up": 0.9, "grad_up": 0.5}
    assert {st.name: e.threshold for st, e in server.out[0].items()} == {"grad_down": 0.999, "act_down": 0.999}
    # DELTA codecs by stream too (unnamed streams: int4); the receiver reads each message's own codec
    assert {st.name: e.delta_codec.name for st, e in clients[0].out.items()} == {"act_up": "int4", "grad_up": "fp32"}
    assert {st.name: e.delta_codec.name for st, e in server.out[0].items()} == {"grad_down": "int4", "act_down": "int2"}
    bb = build_config({}, [f"{t}.enabled=true", f"{t}.controller=bangbang", f"{t}.streams=[act_up,grad_down]",
                           f"{t}.bangbang.aggressive={{act_up: 0.9}}"]).compression.temporal
    r = ReuseControl(bb, clients, s.split.hidden_size, 2, 0, server)
    assert r.thresholds == {"act_up": 0.9, "grad_down": 0.99}


@pytest.mark.parametrize("override,key", [
    ("compression.temporal.threshold={act_up: 0.9, foo: 0.5}", "compression.temporal.threshold"),
    ("compression.entropy=lz4", "compression.entropy"),
    ("compression.temporal.delta_codec=int3", "compression.temporal.delta_codec"),
    ("compression.temporal.delta_codec={act_dwn: int2}", "compression.temporal.delta_codec"),
    ("compression.temporal.delta_codec={act_up: int3}", "compression.temporal.delta_codec"),
    ("compression.temporal.threshold={act_up: 1.5}", "compression.temporal.threshold"),
    ("compression.codec={act_up: int8, grad_up: int8}", "compression.codec"),
    ("compression.grad_codec={grad_dn: int8}", "compression.grad_codec"),
    ("compression.grad_codec={grad_up: int9}", "compression.grad_codec"),
    ("compression.prefix_refresh=true", "compression"),  # needs prefix and DELTA refreshes of act_up
])
def test_bad_compression_keys_name_the_key(override, key):
    with pytest.raises(UserError) as err:
        build_config({}, [override])
    assert str(err.value).startswith(key)
    assert build_config({}, ["compression.temporal.refresh=delta", "compression.temporal.delta_codec=fp32"])


def test_a_sections_own_check_does_not_echo_the_section():
    """A check across a section's keys names the values it read; the section as the user wrote it is not
    appended (it was `(got {'prefix_refresh': True})`), while a single key's error keeps its `(got ...)`."""
    with pytest.raises(UserError) as err:
        build_config({}, ["compression.prefix_refresh=true"])
    assert "got prefix False" in str(err.value) and "{" not in str(err.value)
    with pytest.raises(UserError) as err:
        build_config({}, ["compression.entropy=lz4"])
    assert str(err.value).endswith("(got 'lz4')")


def test_run_with_everything_on_trains_and_sends_less(tmp_path):
    t = "compression.temporal"
    on = {f"{t}.enabled": True, f"{t}.refresh": "delta", f"{t}.threshold": 0.999, "compression.prefix": True,
          "compression.entropy": "zstd", "compression.codec": "int8", "train.epochs": 3}
    base = run(tiny_cfg(**{"train.epochs": 3}), tmp_path / "base", progress=False)
    s = run(tiny_cfg(**on), tmp_path / "on", progress=False)
    act = s["transfers_by_stream"]["act_up"]
    assert act["delta"] > 0 and act["prefix_rows_shared"] > 0 and act["prefix_bytes_saved"] > 0
    assert s["bytes_by_stream"]["act_up"] < 0.25 * base["bytes_by_stream"]["act_up"]
    assert s["bytes_by_stream"]["adapters_up"] < base["bytes_by_stream"]["adapters_up"]
    assert abs(s["val_loss"] - base["val_loss"]) < 0.05 * base["val_loss"]
    assert s["client_cache_bytes"] > 0
    # prefix_refresh: the refreshes share prompts as first sights do, and nothing else changes
    p = run(tiny_cfg(**on, **{"compression.prefix_refresh": True}), tmp_path / "refresh", progress=False)
    pact = p["transfers_by_stream"]["act_up"]
    assert pact["delta"] > 0 and pact["prefix_rows_shared"] > act["prefix_rows_shared"]
    assert pact["delta_bytes"] < act["delta_bytes"] * pact["delta"] / act["delta"]  # less per refresh
    assert abs(p["val_loss"] - s["val_loss"]) < 0.01 * s["val_loss"]
