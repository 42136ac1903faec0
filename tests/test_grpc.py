"""gRPC transport on loopback, in this process: tokens, TLS, bad input, byte counts, fuzzing.

Servers bind 127.0.0.1 port 0; every call and wait has a timeout."""

import logging
import math
import shutil
import struct
import subprocess
import threading

import grpc
import pytest
import torch
from conftest import tiny_cfg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from splitcom.cli import app
from splitcom.compress.codecs import get_codec
from splitcom.deploy.client import ClientDriver, ClientOptions
from splitcom.deploy.server import ServerDriver
from splitcom.errors import ProtocolError, UserError
from splitcom.protocol import serde
from splitcom.protocol import splitcom_pb2 as pb
from splitcom.protocol.messages import AdapterMsg, ControlMsg, LabelsMsg, SampleTensor, Stream, TensorMsg
from splitcom.transport.grpc_client import AuthRefused, Disconnected, GrpcClient, StepRejected
from splitcom.transport.grpc_server import SplitComService, peek, start_server
from splitcom.transport.security import (
    TokenAuth,
    call_metadata,
    load_tokens,
    plaintext_warning,
    server_credentials,
    split_address,
)

TOKENS = {0: "token-zero-0000", 1: "token-one-11111"}
TIMEOUT = 60


class Fake:
    """A coordinator that answers without a model: for tests of the transport alone."""

    max_message_bytes = 4096
    step_streams = frozenset({Stream.act_up})

    def __init__(self):
        self.calls = []

    def hello(self, cid):
        self.calls.append(("hello", cid))
        return {"config_yaml": "model: {}", "session": "fake", "max_message_bytes": self.max_message_bytes}

    def join(self, call):
        self.calls.append(("join", call.cid))
        call.complete(serde.encode(ControlMsg(call.cid, 0, "welcome", {})), start_round=0, session="fake")

    def step(self, call, labels):
        for lab in labels:
            lab.complete(None)
        call.complete(call.payload)  # an echo

    def labels(self, calls):
        self.calls += [("labels", c.cid) for c in calls]
        for c in calls:
            c.complete(None)

    def push(self, call):
        call.complete(None, round=call.header.step)

    def pull(self, call):
        call.complete(None)

    def heartbeat(self, cid, round_):
        return {"session": "fake", "round": round_, "phase": "training"}

    def stream_opened(self, cid):
        return object()

    def stream_closed(self, cid, handle):
        self.calls.append(("closed", cid))


@pytest.fixture
def fake_server():
    coord = Fake()
    service = SplitComService(coord, TokenAuth(TOKENS))
    server, port = start_server(service, "127.0.0.1:0", None, 1 << 20, 8)
    yield f"127.0.0.1:{port}", coord, service
    server.stop(None)


def _act(cid=0, step=0, lengths=(3, 2), hidden=4, stream=Stream.act_up, nan=False):
    c = get_codec("fp32")
    rows = [torch.randn(n, hidden) for n in lengths]
    if nan:
        rows[0][0, 0] = math.nan
    return TensorMsg(stream, cid, step, "fp32", hidden, [SampleTensor(100 + i, r.shape[0], c.encode(r))
                                                        for i, r in enumerate(rows)])


def test_tokens_decide_who_may_call(fake_server):
    address, coord, _ = fake_server
    ok = GrpcClient(address, 0, TOKENS[0])
    assert ok.hello(timeout=TIMEOUT).session == "fake"
    for cid, token in [(0, "wrong-token-000"), (0, TOKENS[1]), (5, TOKENS[0])]:
        with pytest.raises(AuthRefused, match="UNAUTHENTICATED"):
            GrpcClient(address, cid, token).hello(timeout=TIMEOUT)
    bare = grpc.insecure_channel(address).unary_unary("/splitcom.v1.SplitCom/Hello",
                                                     request_serializer=pb.HelloRequest.SerializeToString,
                                                     response_deserializer=pb.HelloReply.FromString)
    with pytest.raises(grpc.RpcError) as err:  # no metadata at all
        bare(pb.HelloRequest(), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # authenticated as 0, but the payload says client 1: refused before the coordinator sees it
    with pytest.raises(AuthRefused, match="PERMISSION_DENIED.*header.client_id"):
        ok.call("Join", pb.Envelope(payload=serde.encode(ControlMsg(1, 0, "join", {}))), TIMEOUT)
    assert ("join", 1) not in coord.calls and ("hello", 0) in coord.calls
    assert ok.call("Join", pb.Envelope(payload=serde.encode(ControlMsg(0, 0, "join", {}))), TIMEOUT).session == "fake"


def test_a_protocol_the_server_does_not_speak_is_refused(fake_server, monkeypatch):
    """Hello with protocol_version 999: FAILED_PRECONDITION naming both versions, before any config is given;
    `splitcom client` of another version exits 2 at once."""
    address, coord, _ = fake_server
    with pytest.raises(grpc.RpcError) as err:
        GrpcClient(address, 0, TOKENS[0]).channel.unary_unary(
            "/splitcom.v1.SplitCom/Hello", request_serializer=pb.HelloRequest.SerializeToString,
            response_deserializer=pb.HelloReply.FromString)(pb.HelloRequest(protocol_version=999),
                                                            metadata=call_metadata(0, TOKENS[0]), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 999" in err.value.details() and f"version {serde.VERSION}" in err.value.details()
    assert ("hello", 0) not in coord.calls
    monkeypatch.setattr(GrpcClient, "hello", lambda self, timeout=30.0: self.call(
        "Hello", pb.HelloRequest(protocol_version=999), timeout))  # a client of another splitcom version
    result = CliRunner().invoke(app, ["client", "--server", address, "--client-id", "0", "--token", TOKENS[0],
                                      "--reconnect-timeout", "5"])
    assert result.exit_code == 2 and "protocol version 999" in result.output, result.output


def test_client_with_a_wrong_token_exits_3(fake_server):
    address, _, _ = fake_server
    result = CliRunner().invoke(app, ["client", "--server", address, "--client-id", "0", "--token", "not-the-token",
                                      "--reconnect-timeout", "5"])
    assert result.exit_code == 3, result.output
    assert "refused client 0" in result.output and "UNAUTHENTICATED" in result.output
    assert "Traceback" not in result.output


def test_bad_messages_get_invalid_argument_naming_the_field(fake_server):
    """Checks in the transport itself; the stream stays open after each rejection."""
    address, coord, service = fake_server
    client = GrpcClient(address, 0, TOKENS[0])
    stream = client.open_stream()
    good = serde.encode(_act())
    cases = [(b"XXXXXXXXXXXXXXXXXXXXXXXX", "header.magic"), (b"SC\x01", "header"),
             (good[:2] + b"\x09" + good[3:], "header.version"), (good[:3] + b"\x09" + good[3:], "header.type"),
             (serde.encode(_act(stream=Stream.grad_down)), "stream"),
             (serde.encode(AdapterMsg(Stream.adapters_up, 0, 0, 1.0, {})), "header.type"),
             (b"SC" + bytes(5000), "payload")]  # larger than the coordinator's max_message_bytes
    for data, field in cases:
        with pytest.raises(StepRejected) as err:
            stream.request(data)
        assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], field), data[:8]
    with pytest.raises(StepRejected) as err:
        stream.request(serde.encode(_act(cid=1)))
    assert (err.value.code, err.value.field) == (grpc.StatusCode.PERMISSION_DENIED.value[0], "header.client_id")
    labels = serde.encode(LabelsMsg(0, 0, {100: [1, 2, 3]}))
    stream.send(labels)  # pipelined: acknowledged with the next reply
    with pytest.raises(StepRejected):  # the step is refused, its labels are still taken (sent only once)
        stream.request(b"XXXXXXXXXXXXXXXXXXXXXXXX")
    assert ("labels", 0) in coord.calls
    stream.send(labels)
    assert stream.request(good).payload == good  # the stream survived every rejection
    with pytest.raises(ProtocolError) as err:  # unary calls: a real gRPC status, field in the trailers
        client.call("PullAdapters", pb.Envelope(payload=b"junk-junk-junk-junk"), TIMEOUT)
    assert err.value.field == "header.magic"
    with pytest.raises(ProtocolError) as err:
        client.call("Join", pb.Envelope(payload=serde.encode(ControlMsg(0, 0, "pull_adapters", {}))), TIMEOUT)
    assert err.value.field == "kind"
    # a corrupt envelope (not protobuf) ends that stream with INVALID_ARGUMENT; the server stays up
    raw = client.channel.stream_stream("/splitcom.v1.SplitCom/Step", request_serializer=lambda b: b,
                                       response_deserializer=pb.StepReply.FromString)
    replies = raw(iter([b"\xff\xff\xff\xff"]), metadata=client.metadata, timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        next(replies)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "envelope" in err.value.details()
    assert client.heartbeat(3).phase == "training"
    stream.close()
    # every envelope we counted is what gRPC serialized, both ways
    assert service.counters.wire.up == service.counters.grpc["up"]
    assert service.counters.wire.down == service.counters.grpc["down"]
    # only the accepted messages count as traffic; each refusal is counted apart, by reason
    # the good step and its echo, and the two labels messages (the first taken though its step was refused)
    assert service.counters.serde.by_stream() == {"act_up": 2 * len(good), "labels_up": 2 * len(labels)}
    assert {"INVALID_ARGUMENT header.magic", "PERMISSION_DENIED header.client_id", "INVALID_ARGUMENT envelope",
            "INVALID_ARGUMENT kind"} <= set(service.counters.rejected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80) | st.builds(lambda d, i, b: d[:i] + bytes([b]) + d[i + 1:],
                                          st.just(serde.encode(_act())), st.integers(0, 40), st.integers(0, 255)))
def test_fuzz_peek_names_a_field_or_accepts(data):
    try:
        h = peek(data)
    except ProtocolError as err:
        assert err.field
    else:
        assert h.type in (1, 2, 3, 4) and data[:2] == serde.MAGIC


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj",
                 f"/CN={ca}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def test_tls_mistakes_are_named_at_once(certs, tmp_path):
    """A client without --tls-ca at a TLS server, with a CA that did not sign it, or with --tls-ca at a
    plaintext server: exit 2 on the first attempt naming the mistake (not 'unreachable' after retrying); a CA
    file that is not PEM: exit 2 naming the file; a port in use: 'address in use'."""
    creds = server_credentials(certs / "server.pem", certs / "server.key")
    tls, port = start_server(SplitComService(Fake(), TokenAuth(TOKENS)), "127.0.0.1:0", creds, 1 << 20, 8)
    plain, plain_port = start_server(SplitComService(Fake(), TokenAuth(TOKENS)), "127.0.0.1:0", None, 1 << 20, 8)
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [(port, [], "speaks TLS: pass --tls-ca"), (port, ["--tls-ca", str(certs / "other-ca.pem")],
                                                       "certificate verify failed (wrong CA?"),
             (plain_port, ["--tls-ca", str(certs / "ca.pem")], "does not speak TLS"),
             (port, ["--tls-ca", str(tmp_path / "junk.pem")], "junk.pem")]
    try:
        for p, flags, needle in cases:
            result = CliRunner().invoke(app, ["client", "--server", f"127.0.0.1:{p}", "--client-id", "0", "--token",
                                              TOKENS[0], "--reconnect-timeout", "300", *flags])
            assert result.exit_code == 2 and needle in result.output, (flags, result.output)
            assert "unreachable" not in result.output
        with pytest.raises(UserError, match="address in use"):
            start_server(SplitComService(Fake(), TokenAuth(TOKENS)), f"127.0.0.1:{port}", None, 1 << 20, 8)
    finally:
        tls.stop(None)
        plain.stop(None)


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mutual_tls(certs, mutual):
    creds = server_credentials(certs / "server.pem", certs / "server.key", certs / "ca.pem" if mutual else None)
    server, port = start_server(SplitComService(Fake(), TokenAuth(TOKENS)), "127.0.0.1:0", creds, 1 << 20, 8)
    address = f"127.0.0.1:{port}"
    try:
        kw = {"cert": certs / "client.pem", "key": certs / "client.key"} if mutual else {}
        assert GrpcClient(address, 0, TOKENS[0], ca=certs / "ca.pem", **kw).hello(timeout=TIMEOUT).session == "fake"
        with pytest.raises(Disconnected):  # plaintext to a TLS port
            GrpcClient(address, 0, TOKENS[0]).hello(timeout=10)
        with pytest.raises(Disconnected):  # a server certificate this CA did not sign
            GrpcClient(address, 0, TOKENS[0], ca=certs / "other-ca.pem").hello(timeout=10)
        if mutual:
            with pytest.raises(Disconnected):  # no client certificate
                GrpcClient(address, 0, TOKENS[0], ca=certs / "ca.pem").hello(timeout=10)
        with pytest.raises(AuthRefused):  # TLS does not replace the token
            GrpcClient(address, 0, "wrong-token-000", ca=certs / "ca.pem", **kw).hello(timeout=TIMEOUT)
    finally:
        server.stop(None)


def test_security_helpers(tmp_path):
    assert plaintext_warning("127.0.0.1", False) is None and plaintext_warning("localhost", False) is None
    assert plaintext_warning("::1", False) is None and plaintext_warning("10.0.0.7", True) is None
    assert "clear text" in plaintext_warning("0.0.0.0", False)
    assert split_address("[::1]:50051") == ("::1", 50051)
    with pytest.raises(UserError, match="HOST:PORT"):
        split_address("localhost")
    (tmp_path / "t.yaml").write_text("0: short\n")
    with pytest.raises(UserError, match="at least 8"):
        load_tokens(tmp_path / "t.yaml")
    with pytest.raises(UserError, match="mutual TLS needs"):
        server_credentials(None, None, tmp_path / "ca.pem")


def _raw_act(sc, batch, step, mutate):
    """The act_up the honest client would send, with ``mutate(samples)`` applied to its samples."""
    with torch.no_grad():
        h = sc.split.head(batch.input_ids, batch.lengths, sc.cut)
    c = get_codec("fp32")
    pairs = enumerate(zip(batch.sample_ids, batch.lengths, strict=True))
    samples = [SampleTensor(sid, n, c.encode(h[i, :n])) for i, (sid, n) in pairs]
    mutate(samples)
    return serde.encode(TensorMsg(Stream.act_up, sc.cid, step, "fp32", sc.split.hidden_size, samples))


def test_bad_steps_are_rejected_and_the_run_goes_on(tmp_path, caplog):
    """A full run (2 clients, 5 steps each) where client 1 spends four turns on bad messages: each is
    answered INVALID_ARGUMENT naming the field and logged; client 0 and the server go on; client 1's
    fifth step, a good one, trains."""
    caplog.set_level(logging.WARNING)
    cfg = tiny_cfg(**{"federation.num_clients": 2, "data.max_train_samples": 80, "train.epochs": 1,
                      "compression.temporal.enabled": True})
    driver = ServerDriver(cfg, tmp_path / "out")
    address = f"127.0.0.1:{driver.listen('127.0.0.1:0', TOKENS)}"
    result, threads = {}, []

    def background(name, fn):
        t = threading.Thread(target=lambda: result.__setitem__(name, fn()), daemon=True)
        t.start()
        threads.append(t)

    background("server", driver.serve)
    background("client0", ClientDriver(ClientOptions(address, 0, TOKENS[0], reconnect_s=TIMEOUT)).run)
    bad = ClientDriver(ClientOptions(address, 1, TOKENS[1], reconnect_s=TIMEOUT))
    bad.connect()
    sc = bad.sc
    sc.join()
    batches, stream = sc.epoch_batches(1), bad.channel._stream()

    def shorter(s):  # declares one token more than its payload holds
        s[0] = SampleTensor(s[0].sample_id, s[0].length + 1, s[0].payload)

    def nan(s):
        s[1] = SampleTensor(s[1].sample_id, s[1].length, struct.pack("<f", math.nan) + s[1].payload[4:])

    def reuse_unknown(s):
        s[0] = SampleTensor(s[0].sample_id, s[0].length, None)

    expected = [(shorter, "samples[0].payload_len"), (nan, "samples[1].payload"),
                (reuse_unknown, "samples[0].sample_id"), (None, "samples[7].payload")]
    for step, (mutate, field) in enumerate(expected):
        b = batches[step]
        stream.send(serde.encode(LabelsMsg(1, step, {sid: b.labels[i, :n].tolist() for i, (sid, n) in
                                                     enumerate(zip(b.sample_ids, b.lengths, strict=True))})))
        data = _raw_act(sc, b, step, mutate or (lambda s: None))
        with pytest.raises(StepRejected) as err:
            stream.request(data if mutate else data[:-5])  # the last case: truncated
        assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], field)
        assert any(field in r.getMessage() for r in caplog.records), field
    assert math.isfinite(sc.train_step(batches[4], 4))  # a good step after four bad ones
    nan_adapter = {k: torch.full_like(v, math.nan) for k, v in sc.bank.state(sc.adapter, sc.layers).items()}
    with pytest.raises(ProtocolError) as err:  # a bad upload is refused; a good one may follow
        bad.channel.send(AdapterMsg(Stream.adapters_up, 1, 0, 40.0, nan_adapter))
    assert err.value.field.startswith("tensors[")
    with pytest.raises(ProtocolError) as err:  # the FedAvg weight is the server's to know, not a claim
        bad.channel.send(AdapterMsg(Stream.adapters_up, 1, 0, 1e9, sc.bank.state(sc.adapter, sc.layers)))
    assert err.value.field == "weight"
    sc.push_adapters(0)
    sc.pull_adapters(0)
    assert bad.channel.last_pull.finished
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive()
    summary = result["server"]
    assert result["client0"]["rejected_steps"] == 0 and result["client0"]["steps"] == 5
    assert summary["dropped"] == [] and math.isfinite(summary["val_loss"])
    assert summary["wire_bytes_up"] == summary["grpc_message_bytes"]["up"]
    # refused traffic is not training traffic: the run's act_up is what the two clients had accepted, and the
    # refused bytes are counted apart by reason
    accepted = result["client0"]["bytes_by_stream"]["act_up"] + bad.channel.counter.by_stream()["act_up"]
    assert summary["bytes_by_stream"]["act_up"] == accepted
    assert {"INVALID_ARGUMENT samples[0].payload_len", "INVALID_ARGUMENT samples[7].payload",
            "INVALID_ARGUMENT weight"} <= set(summary["rejected_bytes"])
    assert all(n > 0 for n in summary["rejected_bytes"].values())
    bad.conn.close()
