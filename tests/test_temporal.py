"""Temporal reuse: REUSE/FULL decisions, exact receiver substitution, RP estimates, end-to-end saving."""

import math

import pytest
import torch
from conftest import tiny_cfg

from splitcom.compress.codecs import get_codec
from splitcom.compress.temporal import TemporalReceiver, TemporalSender, cosine, projection
from splitcom.errors import ProtocolError, UserError
from splitcom.federation.setup import prepare
from splitcom.federation.simulation import build_sfl, run
from splitcom.protocol import serde
from splitcom.protocol.messages import ControlMsg, LabelsMsg, SampleTensor, Stream, TensorMsg
from splitcom.runlog import read_metrics
from splitcom.transport.counters import ByteCounter


def test_decisions_on_constructed_tensors():
    torch.manual_seed(0)
    s = TemporalSender(hidden=32, dim=8, seed=1, stream="act_up")
    x = torch.randn(5, 32)
    assert not s.should_reuse(7, x, 0.5)  # first sight: always FULL
    s.mark_sent(7, x)
    assert s.should_reuse(7, x, 0.999999)  # unchanged
    assert s.should_reuse(7, 3.0 * x, 0.999999)  # cosine ignores scale
    assert not s.should_reuse(7, -x, 0.0)  # opposite: cos = -1
    assert s.should_reuse(7, -x, -1.0)  # threshold -1 accepts anything
    assert not s.should_reuse(7, torch.randn(6, 32), -1.0)  # length changed: FULL
    noisy = x + 0.3 * torch.randn(5, 32)
    sim = s.similarity(7, noisy)
    assert 0.8 < sim < 0.999
    assert s.should_reuse(7, noisy, sim - 1e-9) and not s.should_reuse(7, noisy, sim + 1e-9)


def test_max_reuse_streak_forces_refresh():
    x = torch.randn(3, 16)
    s = TemporalSender(16, 4, 0, "act_up", max_reuse_streak=2)
    s.mark_sent(1, x)
    decisions = []
    for _ in range(6):
        reuse = s.should_reuse(1, x, 0.9)
        decisions.append(reuse)
        s.mark_reused(1) if reuse else s.mark_sent(1, x)
    assert decisions == [True, True, False, True, True, False]


def test_projection_is_rebuilt_from_seed_and_stream():
    assert torch.equal(projection(64, 8, 3, "act_up"), projection(64, 8, 3, "act_up"))
    assert not torch.equal(projection(64, 8, 3, "act_up"), projection(64, 8, 3, "grad_down"))
    assert not torch.equal(projection(64, 8, 3, "act_up"), projection(64, 8, 4, "act_up"))


def test_rp_cosine_within_johnson_lindenstrauss_bounds():
    """For unit vectors, P(|cos_est - cos| > eps) <= 2 exp(-r eps^2 / 8) (a JL inner-product bound)."""
    g = torch.Generator().manual_seed(0)
    h, pairs, eps = 256, 300, 0.25
    mean_err = {}
    for r in (16, 256):
        errs = []
        for i in range(pairs):
            R = projection(h, r, i, "jl")
            x = torch.randn(1, h, generator=g)
            y = x + torch.randn(1, h, generator=g) * (i % 5) * 0.3  # a spread of true cosines
            errs.append(abs(cosine(x @ R, y @ R) - cosine(x, y)))
        frac = sum(e > eps for e in errs) / pairs
        assert frac <= 2 * math.exp(-r * eps**2 / 8) + 0.02
        mean_err[r] = sum(errs) / pairs
    # estimation error shrinks like 1/sqrt(r): 16x more columns, about 4x less error
    assert 2.5 < mean_err[16] / mean_err[256] < 6.5


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_receiver_reproduces_what_the_sender_meant(codec):
    """Over serde and a lossy codec, the server's tensor for a REUSE is the decoded last FULL, and the
    sender's summary describes exactly that tensor."""
    c = get_codec(codec)
    s, r = TemporalSender(16, 4, 0, "act_up"), TemporalReceiver()
    x = torch.randn(4, 16)
    payload = c.encode(x)
    s.mark_sent(9, c.decode(payload, 4, 16))
    full = serde.decode(serde.encode(TensorMsg(Stream.act_up, 0, 0, codec, 16, [SampleTensor(9, 4, payload)])))
    r.put(9, c.decode(full.samples[0].payload, 4, 16))
    x2 = x * 1.0001
    assert s.should_reuse(9, x2, 0.999)
    reuse = serde.decode(serde.encode(TensorMsg(Stream.act_up, 0, 1, codec, 16, [SampleTensor(9, 4, None)])))
    got = r.get(reuse.samples[0].sample_id, 4)
    assert torch.equal(got, c.decode(payload, 4, 16))
    assert torch.equal(s.summary(got), s.summaries[9])


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_receiver_unknown_id_is_protocol_error(store, tmp_path):
    r = TemporalReceiver(store, tmp_path if store == "disk" else None)
    with pytest.raises(ProtocolError, match="sample id 42"):
        r.get(42, 3)
    r.put(42, torch.ones(3, 2))
    assert torch.equal(r.get(42, 3), torch.ones(3, 2))
    with pytest.raises(ProtocolError, match="length"):
        r.get(42, 4)
    assert r.memory_bytes == 24


def test_server_rejects_unknown_reuse_and_keeps_other_clients_state():
    cfg = tiny_cfg(**{"compression.temporal.enabled": True, "federation.num_clients": 2})
    s = prepare(cfg)
    server, clients = build_sfl(s, ByteCounter())
    batch = clients[0].epoch_batches(1)[0]
    clients[0].train_step(batch, 0)
    before = {k: v.clone() for k, v in s.bank.state("c1").items()}
    # client 1 claims a REUSE for a sample it never sent
    server.handle_bytes(1, serde.encode(LabelsMsg(1, 0, {5: [1, 2, 3]})))
    reply = serde.decode(server.handle_bytes(1, serde.encode(
        TensorMsg(Stream.act_up, 1, 0, "fp32", s.split.hidden_size, [SampleTensor(5, 3, None)]))))
    assert isinstance(reply, ControlMsg) and reply.kind == "error"
    assert "sample id 5" in reply.body["message"] and reply.body["field"] == "samples[0].sample_id"
    assert all(torch.equal(v, s.bank.state("c1")[k]) for k, v in before.items())
    assert 5 not in server.inc[1][Stream.act_up].receiver
    clients[0].train_step(batch, 1)  # the server is still serving


def test_end_to_end_reuse_cuts_act_up_and_is_deterministic(tmp_path):
    over = {"compression.temporal.enabled": True, "compression.temporal.threshold": -1.0,
            "compression.temporal.projection_dim": 8}
    a = run(tiny_cfg(**over), tmp_path / "a", progress=False)
    b = run(tiny_cfg(**over), tmp_path / "b", progress=False)
    base = run(tiny_cfg(), tmp_path / "base", progress=False)
    # threshold -1: epoch 1 all FULL, epoch 2 all REUSE (headers only)
    assert a["reuse_ratio_by_epoch"] == [0.0, 1.0] and a["reuse_ratio"] == 0.5
    assert a["bytes_by_stream"]["act_up"] < 0.51 * base["bytes_by_stream"]["act_up"]
    volatile = {"wall_s", "peak_rss_bytes"}
    assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
    h, r = a["hidden_size"], 8
    assert a["client_cache_bytes"] * h == a["server_cache_bytes"] * r  # summaries are r/H of full tensors
    assert a["threshold_by_epoch"] == [-1.0, -1.0]


def test_projection_dim_above_hidden_is_user_error(tmp_path):
    with pytest.raises(UserError, match="compression.temporal.projection_dim"):
        run(tiny_cfg(**{"compression.temporal.enabled": True, "compression.temporal.projection_dim": 65}),
            tmp_path, progress=False)


def test_skip_reused_gradients_sends_no_gradient(tmp_path):
    over = {"compression.temporal.enabled": True, "compression.temporal.threshold": -1.0,
            "compression.temporal.reused_grad": "skip"}
    a = run(tiny_cfg(**over), tmp_path, progress=False)
    # epoch 2 is all REUSE, so all SKIP: grad_down is about half of act_up's full-epoch bytes
    assert a["bytes_by_stream"]["grad_down"] < 0.51 * (a["bytes_by_stream"]["act_up"] * 2)


def test_bangbang_in_a_run_uses_its_two_levels(tmp_path):
    over = {"compression.temporal.enabled": True, "compression.temporal.controller": "bangbang",
            "compression.temporal.bangbang.aggressive": 0.9, "compression.temporal.bangbang.conservative": 0.99,
            "train.epochs": 3}
    s = run(tiny_cfg(**over), tmp_path, progress=False)
    assert s["threshold_by_epoch"][0] == 0.9  # starts aggressive
    assert set(s["threshold_by_epoch"]) <= {0.9, 0.99}
    events = [e for e in read_metrics(tmp_path / "metrics.jsonl") if e["event"] == "reuse"]
    assert [e["threshold"] for e in events] == s["threshold_by_epoch"]
    assert all({"reuse_ratio", "act_up_bytes", "val_loss"} <= set(e) for e in events)


def test_ddpg_agent_is_saved_and_warm_starts(tmp_path):
    over = {"compression.temporal.enabled": True, "compression.temporal.controller": "ddpg",
            "compression.temporal.ddpg.low": 0.9, "compression.temporal.ddpg.high": 0.999}
    s = run(tiny_cfg(**over), tmp_path / "a", progress=False)
    agent = tmp_path / "a" / "ddpg_agent.zip"
    assert s["ddpg_agent"] == str(agent) and agent.is_file()
    assert all(0.9 <= t <= 0.999 for t in s["threshold_by_epoch"])
    warm = run(tiny_cfg(**over, **{"compression.temporal.ddpg.load": str(agent)}), tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "ddpg_agent.zip").is_file() and len(warm["threshold_by_epoch"]) == 2


def test_ddpg_missing_load_path_names_the_key(tmp_path):
    over = {"compression.temporal.enabled": True, "compression.temporal.controller": "ddpg",
            "compression.temporal.ddpg.load": str(tmp_path / "nope.zip")}
    with pytest.raises(UserError, match="compression.temporal.ddpg.load"):
        run(tiny_cfg(**over), tmp_path / "x", progress=False)


def test_server_rejects_false_weight_and_partial_upload():
    from splitcom.protocol.messages import AdapterMsg

    s = prepare(tiny_cfg(**{"federation.num_clients": 2}))
    server, clients = build_sfl(s, ByteCounter(), cuts={0: 2, 1: 2})
    server.weights = {0: 24.0, 1: 24.0}
    state = s.bank.state("c0", range(2))
    for weight, tensors, cut, field in [(1e9, state, 2, "weight"), (24.0, dict(list(state.items())[:1]), 2, "tensors"),
                                        (24.0, state, 3, "cut")]:
        reply = serde.decode(server.handle_bytes(0, serde.encode(AdapterMsg(Stream.adapters_up, 0, 0, weight,
                                                                            tensors, cut))))
        assert reply.kind == "error" and reply.body["field"] == field
    assert server.uploads == {}


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_lossy_codec_error_is_not_taken_for_drift(codec):
    """An unchanged tensor must be reusable under a lossy codec (summary of the source); comparing with
    the decoded copy instead counts the quantisation error as drift and never reuses at 0.9999."""
    from splitcom.compress.pipeline import Outgoing

    torch.manual_seed(0)
    x = torch.randn(12, 64) * torch.linspace(0.1, 10, 64)  # uneven channels, as LLM activations have
    src = Outgoing(Stream.act_up, codec, 64, reuse=True, threshold=0.9999, summary_of="source")
    dec = Outgoing(Stream.act_up, codec, 64, reuse=True, threshold=0.9999, summary_of="decoded")
    for end in (src, dec):
        assert not end.encode(3, x).reuse  # first sight
    assert src.encode(3, x * 1.00001).reuse
    if codec == "int4":  # int8's error is small enough that the decoded comparison still passes 0.9999
        assert not dec.encode(3, x * 1.00001).reuse


def test_channel_normalised_summary_sees_drift_behind_a_massive_channel():
    from splitcom.compress.temporal import TemporalSender

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 64, generator=g)
    x[:, 3] *= 1000  # one massive channel, as transformer hidden states have
    y = x.clone()
    y[:, [c for c in range(64) if c != 3]] = torch.randn(12, 63, generator=g)  # everything else moved
    plain, chan = TemporalSender(64, 16, 0, "act_up"), TemporalSender(64, 16, 0, "act_up", norm="channel")
    for s in (plain, chan):
        s.mark_sent(7, x)
    assert plain.should_reuse(7, y, 0.999)  # the massive channel hides the drift
    assert not chan.should_reuse(7, y, 0.999)
    assert chan.should_reuse(7, x, 0.999999)  # the same tensor is still the same
    st = chan.state()
    fresh = TemporalSender(64, 16, 0, "act_up", norm="channel")
    fresh.load_state(st)
    assert fresh.similarity(7, y) == chan.similarity(7, y)


def _drifting(out, budget_run: int = 40, seed: int = 0) -> list[str]:
    """Sample 0..7 seen once, then ``budget_run`` repeat sightings, each drifted so its summary cosine sits
    between the two levels; the kinds of the repeats, in order."""
    g = torch.Generator().manual_seed(seed)
    x = {sid: torch.randn(6, 64, generator=g) for sid in range(8)}
    out.message(0, 0, list(x), list(x.values()))
    kinds = []
    for i in range(budget_run):
        sid = i % 8
        x[sid] = x[sid] + 0.05 * torch.randn(6, 64, generator=g)
        msg = out.message(0, i + 1, [sid], [x[sid]])
        kinds += ["reuse" if msg.samples[0].payload is None else "delta" if msg.samples[0].delta else "full"]
    return kinds


def test_bangbang_budget_keeps_repeat_sightings_within_it():
    """bangbang.budget: sample by sample, the aggressive level while the repeat sightings so far cost more
    than the budget, the conservative one otherwise; so the repeats cost the budget (within one sample's
    DELTA), where the aggressive level alone reuses every one and the conservative one reuses none. After
    val loss got worse (the controller's conservative level) the budget is suspended."""
    from splitcom.compress.pipeline import Outgoing

    def end(threshold, budget=None):
        return Outgoing(Stream.act_up, "int8", 64, reuse=True, threshold=threshold, refresh="delta",
                        delta_codec="int8", budget=budget, levels=(0.9, 0.99999))

    assert set(_drifting(end(0.9))) == {"reuse"} and set(_drifting(end(0.99999))) == {"delta"}
    for budget in (0.2, 0.5):
        out = end(0.9, budget)
        kinds = _drifting(out)
        assert {"reuse", "delta"} <= set(kinds)
        one_delta = out.delta_bytes / out.sent_delta
        assert out.repeat_bytes <= budget * out.repeat_full_bytes + one_delta
        assert out.repeat_bytes >= budget * out.repeat_full_bytes - one_delta
        assert out.repeat_full_bytes == 40 * get_codec("int8").nbytes(6, 64)
    guarded = end(0.99999, 0.2)  # val loss got worse: conservative for the epoch, whatever the budget
    assert set(_drifting(guarded)) == {"delta"} and guarded.repeat_bytes > 0.2 * guarded.repeat_full_bytes


def test_bangbang_budget_is_checked(tmp_path):
    T = "compression.temporal"
    for over, key in (({f"{T}.bangbang.budget": 0.1}, "compression.temporal"),  # needs controller: bangbang
                      ({f"{T}.controller": "bangbang", f"{T}.bangbang.budget": {"grad_down": 0.1}},
                       "compression.temporal"),  # grad_down does not use reuse here
                      ({f"{T}.controller": "bangbang", f"{T}.bangbang.budget": 1.5}, "bangbang.budget"),
                      ({f"{T}.controller": "bangbang", f"{T}.bangbang.budget": {"act_sideways": 0.1}},
                       "bangbang.budget")):
        with pytest.raises(UserError, match="budget") as err:
            tiny_cfg(**{f"{T}.enabled": True, **over})
        assert key in str(err.value) or key in (err.value.where or "")
