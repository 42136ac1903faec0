"""gRPC client transport: ``GrpcChannel`` is the ``Channel`` SplitClient steps through in deployment.

Step traffic (labels, activations -> gradients) goes over one bidirectional stream per connection;
labels are pipelined (their acknowledgements are read with the next reply), so a step costs one round
trip, as in-process. Join, adapter push/pull and heartbeat are unary calls. Bytes are counted like
the in-process channel (serde payloads, per stream and direction) plus the envelopes (``wire``) and
what gRPC itself serialized (``grpc``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque

import grpc

from splitcom.errors import ProtocolError
from splitcom.protocol import serde
from splitcom.protocol import splitcom_pb2 as pb
from splitcom.protocol.messages import (
    DIRECTION,
    AdapterMsg,
    ControlMsg,
    LabelsMsg,
    Message,
    TensorMsg,
    stream_of,
)
from splitcom.transport.counters import ByteCounter
from splitcom.transport.grpc_server import SERVICE
from splitcom.transport.security import call_metadata, channel_credentials


class TransportError(Exception):
    """A call failed for a reason the client driver reacts to (its subclasses); bad messages raise
    ProtocolError instead, like the in-process channel."""


class AuthRefused(TransportError):
    """UNAUTHENTICATED or PERMISSION_DENIED: wrong or missing token, or another client's id."""


class Dropped(TransportError):
    """FAILED_PRECONDITION: the server dropped this client from the round; it may join again."""


class RunAborted(TransportError):
    """ABORTED: the server gave up on the run."""


class Disconnected(TransportError):
    """The server is unreachable or the call broke (UNAVAILABLE, CANCELLED, ...): reconnect."""


class StepRejected(ProtocolError):
    """The server rejected one step message (INVALID_ARGUMENT naming ``field``); the stream goes on."""

    def __init__(self, code: int, message: str, field: str | None):
        self.code = code
        super().__init__(message, field=field or None)


_BY_CODE = {grpc.StatusCode.UNAUTHENTICATED: AuthRefused, grpc.StatusCode.PERMISSION_DENIED: AuthRefused,
            grpc.StatusCode.FAILED_PRECONDITION: Dropped, grpc.StatusCode.ABORTED: RunAborted}


def translate(err: grpc.RpcError) -> Exception:
    """A gRPC error as the exception the client driver handles."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = dict(err.trailing_metadata() or ()).get("x-splitcom-field") or None
        return ProtocolError(details.removeprefix(f"{field}: ") if field else details, field=field)
    return _BY_CODE.get(code, Disconnected)(f"{code.name}: {details}")


def _in_band(status) -> Exception:
    """A step reply's status (pb.Status) as the exception the driver handles."""
    if status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]:
        return Dropped(status.message)
    if status.code == grpc.StatusCode.ABORTED.value[0]:
        return RunAborted(status.message)
    return StepRejected(status.code, status.message, status.field)


class GrpcClient:
    """The connection of one client id: unary calls and the step stream, all authenticated."""

    def __init__(self, address: str, client_id: int, token: str, *, ca=None, cert=None, key=None,
                 max_message_bytes: int = 1 << 30):
        self.address, self.client_id = address, client_id
        self.metadata = call_metadata(client_id, token)
        creds = channel_credentials(ca, cert, key)
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                   ("grpc.enable_retries", 0), ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2_000)]
        self.channel = (grpc.secure_channel(address, creds, options) if creds is not None
                        else grpc.insecure_channel(address, options))
        self.grpc_bytes = {"up": 0, "down": 0}  # what gRPC serialized, both ways
        self._lock = threading.Lock()
        self._calls = {}
        for method in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{method.name}"
            rep_cls = getattr(pb, method.output_type.name)
            factory = self.channel.stream_stream if method.client_streaming else self.channel.unary_unary
            self._calls[method.name] = factory(path, request_serializer=self._serializer,
                                               response_deserializer=self._deserializer(rep_cls))

    def _serializer(self, msg) -> bytes:
        out = msg.SerializeToString()
        with self._lock:
            self.grpc_bytes["up"] += len(out)
        return out

    def _deserializer(self, cls):
        def parse(data: bytes):
            with self._lock:
                self.grpc_bytes["down"] += len(data)
            return cls.FromString(data)
        return parse

    def call(self, name: str, request, timeout: float | None = None):
        try:
            return self._calls[name](request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise translate(err) from None

    def hello(self, timeout: float | None = 30.0) -> pb.HelloReply:
        return self.call("Hello", pb.HelloRequest(protocol_version=serde.VERSION), timeout)

    def heartbeat(self, round_: int, timeout: float = 10.0) -> pb.HeartbeatReply:
        return self.call("Heartbeat", pb.HeartbeatRequest(round=round_), timeout)

    def open_stream(self) -> StepStream:
        return StepStream(self._calls["Step"], self.metadata)

    def close(self) -> None:
        self.channel.close()


_END = object()


class StepStream:
    """One bidirectional Step call. ``send`` does not wait; ``request`` waits for its own reply and
    checks the acknowledgements of the sends before it (the server answers every message in order)."""

    def __init__(self, step_call, metadata):
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._seq = 0
        self._unacked: deque[int] = deque()
        self._replies = step_call(iter(self._out.get, _END), metadata=metadata)
        self.closed = False  # the call ended (server gone, or it aborted the stream): open a new one

    def _put(self, data: bytes, forward_s: float = 0.0, backward_s: float = 0.0) -> int:
        self._seq += 1
        self._out.put(pb.StepRequest(payload=data, seq=self._seq, forward_s=forward_s, backward_s=backward_s))
        return self._seq

    def send(self, data: bytes) -> None:
        self._unacked.append(self._put(data))

    def request(self, data: bytes, forward_s: float = 0.0, backward_s: float = 0.0) -> pb.StepReply:
        seq = self._put(data, forward_s, backward_s)
        first_error = None
        while True:
            try:
                reply = next(self._replies)
            except grpc.RpcError as err:  # the call ended: server gone, or the stream was aborted
                self.closed = True
                raise translate(err) from None
            except StopIteration:
                self.closed = True
                raise Disconnected("the server ended the step stream") from None
            if reply.status.code and first_error is None:
                first_error = reply.status
            if reply.seq == seq:
                break
            if not self._unacked or self._unacked.popleft() != reply.seq:
                raise ProtocolError(f"reply for message {reply.seq} out of order", field="seq")
        self._unacked.clear()
        if first_error is not None:
            raise _in_band(first_error)
        return reply

    def close(self) -> None:
        self._out.put(_END)
        self._replies.cancel()


class GrpcChannel:
    """``transport.base.Channel`` over gRPC, for SplitClient (the same step logic as simulation).

    join and pull_adapters requests go to the Join / PullAdapters calls; their extra fields (start
    round, threshold, finished) are kept in ``last_join`` / ``last_pull`` for the driver. Uploads carry
    the counters returned by ``stats`` (a callable set by the driver; dict of pb.ClientStats fields).
    """

    def __init__(self, client: GrpcClient, counter: ByteCounter | None = None):
        self.client, self.client_id = client, client.client_id
        self.counter = counter or ByteCounter()
        self.stream: StepStream | None = None
        self.last_join: pb.JoinReply | None = None
        self.last_pull: pb.PullReply | None = None
        self.stats = dict
        self._step_start = self._reply_at = None
        self.backward_s = 0.0

    # timing for the server's schedule (forward = step start -> send, backward = reply -> step end)
    def step_started(self) -> None:
        self._step_start = time.perf_counter()

    def step_finished(self) -> None:
        if self._reply_at is not None:
            self.backward_s = time.perf_counter() - self._reply_at

    def reset_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def _stream(self) -> StepStream:
        if self.stream is None or self.stream.closed:
            self.stream = self.client.open_stream()
        return self.stream

    def _encode(self, msg: Message) -> bytes:
        data = serde.encode(msg)
        stream = stream_of(msg)
        self.counter.add(stream, DIRECTION.get(stream, "up"), len(data))
        return data

    def _decode(self, data: bytes) -> Message:
        reply = serde.decode(data)
        stream = stream_of(reply)
        self.counter.add(stream, DIRECTION.get(stream, "down"), len(data))
        if isinstance(reply, ControlMsg) and reply.kind == "error":
            raise ProtocolError(reply.body.get("message", "server error"), field=reply.body.get("field"))
        return reply

    def send(self, msg: Message) -> None:
        data = self._encode(msg)
        if isinstance(msg, LabelsMsg):
            self._stream().send(data)
        elif isinstance(msg, AdapterMsg):
            self.client.call("PushAdapters", pb.PushRequest(payload=data, stats=pb.ClientStats(**self.stats())))
        else:
            raise ProtocolError(f"cannot send a {type(msg).__name__} without a reply", field="message")

    def request(self, msg: Message) -> Message:
        data = self._encode(msg)
        if isinstance(msg, TensorMsg):
            forward = time.perf_counter() - self._step_start if self._step_start is not None else 0.0
            reply = self._stream().request(data, forward, self.backward_s)
            self._reply_at = time.perf_counter()
            return self._decode(reply.payload)
        if isinstance(msg, ControlMsg) and msg.kind == "join":
            self.last_join = self.client.call("Join", pb.Envelope(payload=data))
            return self._decode(self.last_join.payload)
        if isinstance(msg, ControlMsg) and msg.kind == "pull_adapters":
            self.last_pull = self.client.call("PullAdapters", pb.Envelope(payload=data))
            return self._decode(self.last_pull.payload)
        raise ProtocolError(f"no call carries a {type(msg).__name__} request", field="message")
