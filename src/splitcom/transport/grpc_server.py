"""gRPC server transport: authenticated envelopes in, serde bytes to the deployment driver, replies out.

This layer knows gRPC and protobuf; the driver behind it (``Coordinator``, splitcom/deploy/) sees
client ids and serde bytes only, like ``SplitServer.handle_bytes``. Per message it: authenticates the
call (token per client id), refuses oversized payloads, checks the serde header (message type for this
rpc, client id = the authenticated one), hands a ``Call`` to the driver, and turns the driver's reply,
or its rejection, into a protobuf reply or a gRPC status. It never raises out of a handler for bad
input: a bad message gets INVALID_ARGUMENT naming the field, and the server stays up.

Bytes are counted three ways: ``serde`` (the payloads, what the in-process transport counts), ``wire``
(protobuf ``ByteSize`` of every envelope) and ``grpc`` (the lengths gRPC itself hands to and takes
from our (de)serializers); tests check that ``wire`` and ``grpc`` agree.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Protocol

import grpc

from splitcom.errors import ProtocolError, UserError
from splitcom.protocol import serde
from splitcom.protocol import splitcom_pb2 as pb
from splitcom.protocol.messages import DIRECTION, ControlMsg, Stream
from splitcom.transport.counters import ByteCounter
from splitcom.transport.security import AuthError, TokenAuth

log = logging.getLogger("splitcom.grpc")
SERVICE = pb.DESCRIPTOR.services_by_name["SplitCom"]
TENSOR, LABELS, ADAPTER, CONTROL = 1, 2, 3, 4
INVALID, DROPPED = "INVALID_ARGUMENT", "FAILED_PRECONDITION"


# ---- serde header peeks (no full decode on the hot path) ------------------------------------------
@dataclass(frozen=True)
class Header:
    type: int
    client_id: int
    step: int  # the round for adapters and pull requests
    stream: Stream


def peek(data: bytes) -> Header:
    """The serde header of a message, validated like serde.decode validates it."""
    if len(data) < serde.HEADER.size:
        raise ProtocolError(f"truncated: {len(data)} bytes, the header needs {serde.HEADER.size}", field="header")
    magic, version, kind, cid, step, _ = serde.HEADER.unpack_from(data)
    if magic != serde.MAGIC:
        raise ProtocolError(f"bad magic {magic!r}", field="header.magic")
    if version != serde.VERSION:
        raise ProtocolError(f"unsupported version {version}", field="header.version")
    if kind in (TENSOR, ADAPTER):
        if len(data) <= serde.HEADER.size:
            raise ProtocolError("truncated before the stream byte", field="stream")
        try:
            stream = Stream(data[serde.HEADER.size])
        except ValueError:
            raise ProtocolError(f"unknown stream {data[serde.HEADER.size]}", field="stream") from None
    elif kind == LABELS:
        stream = Stream.labels_up
    elif kind == CONTROL:
        stream = Stream.control
    else:
        raise ProtocolError(f"unknown message type {kind}", field="header.type")
    return Header(kind, cid, step, stream)


def error_of(reply: bytes | None) -> tuple[str, str] | None:
    """(message, field) when a serde reply is an ``error`` ControlMsg, else None."""
    if not reply or reply[3] != CONTROL:
        return None
    msg = serde.decode(reply)
    if isinstance(msg, ControlMsg) and msg.kind == "error":
        return str(msg.body.get("message", "rejected")), str(msg.body.get("field") or "")
    return None


def adapter_weight(data: bytes) -> float:
    """The FedAvg weight of an AdapterMsg (peeked: type checked), read from its header."""
    return struct.unpack_from("<d", data, serde.HEADER.size + 1)[0]


def loss_of(reply: bytes) -> float:
    """The scalar (batch loss) of a grad_down TensorMsg, read from its header."""
    return struct.unpack_from("<d", reply, serde.HEADER.size + 8)[0]


# ---- one inbound message ----------------------------------------------------------------------------
class Rejected(Exception):
    """Raised (or passed to Call.reject) by the driver: ``code`` is a grpc.StatusCode name."""

    def __init__(self, code: str, message: str, field: str = ""):
        self.code, self.field = code, field
        super().__init__(f"{field}: {message}" if field else message)


class Counters:
    """serde / wire / gRPC byte counts of one server, by stream and direction where known."""

    def __init__(self) -> None:
        self.serde, self.wire = ByteCounter(), ByteCounter()
        self.grpc = {"up": 0, "down": 0}
        self.rejected: dict[str, int] = {}  # "CODE field" -> bytes of refused messages and their answers
        self._lock = threading.Lock()

    def reject(self, reason: str, n: int) -> None:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + n

    def raw(self, direction: str, n: int) -> None:
        with self._lock:
            self.grpc[direction] += n


class Call:
    """One message from an authenticated client, answered exactly once by ``complete`` or ``reject``.

    Counting happens there, when the driver serves the message (step traffic is served in schedule
    order, so the counters advance in the same order as in simulation)."""

    def __init__(self, rpc: str, cid: int, request, header: Header | None, counters: Counters,
                 wire_in: int, is_active: Callable[[], bool] = lambda: True):
        self.rpc, self.cid, self.request, self.header = rpc, cid, request, header
        self.payload: bytes = getattr(request, "payload", b"")
        self.counters, self.wire_in, self.is_active = counters, wire_in, is_active
        self.reply = None  # the protobuf reply, once answered
        self.status: tuple[str, str, str] | None = None  # (code, message, field) for a rejection
        self.done = threading.Event()

    def _count(self, reply_payload: bytes | None, reply_size: int) -> None:
        """serde: by stream and its direction, as the in-process channel counts; wire: requests up,
        replies down, as the envelopes travel. A refused message (and its answer) is not training traffic:
        it crossed the wire, but its bytes count apart, by reason, in ``rejected``, never in serde's totals."""
        stream = self.header.stream if self.header is not None else Stream.control
        if self.status is not None:
            code, _, field = self.status
            self.counters.reject(f"{code} {field}".strip(), self.wire_in + reply_size)
            self.counters.wire.add(stream if self.header is not None else Stream.control, "up", self.wire_in)
            if reply_size:
                self.counters.wire.add(stream, "down", reply_size)
            return
        if self.payload:
            self.counters.serde.add(stream, DIRECTION.get(stream, "up"), len(self.payload))
        self.counters.wire.add(stream, "up", self.wire_in)
        rstream = peek(reply_payload).stream if reply_payload else Stream.control
        if reply_payload:
            self.counters.serde.add(rstream, DIRECTION.get(rstream, "down"), len(reply_payload))
        if reply_size:
            self.counters.wire.add(rstream, "down", reply_size)

    def complete(self, reply_payload: bytes | None, **fields) -> None:
        err = error_of(reply_payload)
        if err is not None:
            self.status = (INVALID, err[0], err[1])
        self.reply = _reply(self, reply_payload, self.status, fields)
        self._count(reply_payload, self.reply.ByteSize() if self.reply is not None else 0)
        self.done.set()

    def reject(self, code: str, message: str, field: str = "") -> None:
        log.warning("client %s: %s rejected (%s): %s%s", self.cid, self.rpc, code, f"{field}: " if field else "",
                    message)
        self.status = (code, message, field)
        self.reply = _reply(self, None, self.status, {})
        self._count(None, self.reply.ByteSize() if self.reply is not None else 0)
        self.done.set()


def _reply(call: Call, payload: bytes | None, status, fields: dict):
    """Step replies carry their status in-band; unary rejections become a gRPC status (no reply)."""
    if call.rpc == "Step":
        out = pb.StepReply(payload=payload or b"", seq=call.request.seq)
        if status is not None:
            out.status.code, out.status.message, out.status.field = (
                getattr(grpc.StatusCode, status[0]).value[0], status[1], status[2])
        return out
    if status is not None:
        return None
    cls = {"Join": pb.JoinReply, "PushAdapters": pb.Ack, "PullAdapters": pb.PullReply}[call.rpc]
    return cls(**({"payload": payload or b""} if "payload" in cls.DESCRIPTOR.fields_by_name else {}), **fields)


class Coordinator(Protocol):
    """What the transport needs from the deployment driver (deploy/coordinator.py)."""

    max_message_bytes: int
    step_streams: frozenset[Stream]  # tensor streams a client may send on its step stream

    def hello(self, cid: int) -> dict: ...  # pb.HelloReply fields
    def join(self, call: Call) -> None: ...
    def step(self, call: Call, labels: list[Call]) -> None: ...  # blocks until served
    def labels(self, calls: list[Call]) -> None: ...  # labels whose step was rejected: serve them now
    def push(self, call: Call) -> None: ...
    def pull(self, call: Call) -> None: ...  # blocks until the round is finished
    def heartbeat(self, cid: int, round_: int) -> dict: ...  # pb.HeartbeatReply fields
    def stream_opened(self, cid: int) -> object: ...
    def stream_closed(self, cid: int, handle: object) -> None: ...


# ---- the service ------------------------------------------------------------------------------------
class _Corrupt:
    """What a request deserializes to when its bytes are not a valid envelope."""

    def __init__(self, size: int, reason: str):
        self.size, self.reason = size, reason


EXPECTED = {"Join": {CONTROL}, "Step": {TENSOR, LABELS}, "PushAdapters": {ADAPTER}, "PullAdapters": {CONTROL}}


class SplitComService:
    def __init__(self, coordinator: Coordinator, auth: TokenAuth, counters: Counters | None = None):
        self.coord, self.auth = coordinator, auth
        self.counters = counters or Counters()

    # -- checks shared by every rpc --
    def _authenticate(self, context) -> int:
        try:
            return self.auth.authenticate(context.invocation_metadata())
        except AuthError as err:
            log.warning("refused a call from %s: %s", context.peer(), err)
            context.abort(err.code, str(err))
            raise  # unreachable: abort raises

    def _call(self, rpc: str, cid: int, request, context) -> Call:
        """Validate one message; a Call with ``status`` set when it is rejected already."""
        if isinstance(request, _Corrupt):
            call = Call(rpc, cid, pb.Envelope(), None, self.counters, request.size, context.is_active)
            call.reject(INVALID, f"not a valid {rpc} envelope ({request.reason})", "envelope")
            return call
        call = Call(rpc, cid, request, None, self.counters, request.ByteSize(), context.is_active)
        if len(call.payload) > self.coord.max_message_bytes:
            call.reject(INVALID, f"message of {len(call.payload)} bytes exceeds the limit of "
                        f"{self.coord.max_message_bytes} bytes for this run", "payload")
            return call
        try:
            call.header = peek(call.payload)
        except ProtocolError as err:
            call.reject(INVALID, str(err).removeprefix(f"{err.field}: "), err.field or "payload")
            return call
        if call.header.client_id != cid:
            call.reject("PERMISSION_DENIED", f"message claims client {call.header.client_id} on client {cid}'s "
                        "authenticated call", "header.client_id")
        elif call.header.type not in EXPECTED[rpc]:
            call.reject(INVALID, f"message type {call.header.type} does not belong on {rpc}", "header.type")
        elif call.header.type == TENSOR and call.header.stream not in self.coord.step_streams:
            call.reject(INVALID, f"{call.header.stream.name} does not belong on the step stream", "stream")
        return call

    def _unary(self, rpc: str, request, context, serve: Callable[[Call], None]):
        cid = self._authenticate(context)
        call = self._call(rpc, cid, request, context)
        if call.status is None and rpc in ("Join", "PullAdapters"):
            try:
                kind = serde.decode(call.payload).kind
            except ProtocolError as err:
                call.reject(INVALID, str(err), err.field or "payload")
            else:
                want = "join" if rpc == "Join" else "pull_adapters"
                if kind != want:
                    call.reject(INVALID, f"control kind {kind!r} does not belong on {rpc} (expected {want!r})",
                                "kind")
        if call.status is None:
            try:
                serve(call)
            except Rejected as err:
                call.reject(err.code, str(err).removeprefix(f"{err.field}: "), err.field)
        if call.status is not None:
            code, message, field = call.status
            context.set_trailing_metadata((("x-splitcom-field", field),))
            context.abort(getattr(grpc.StatusCode, code), f"{field}: {message}" if field else message)
        return call.reply

    # -- rpcs --
    def Hello(self, request, context):  # noqa: N802 (gRPC method names)
        cid = self._authenticate(context)
        if isinstance(request, _Corrupt) or request.protocol_version != serde.VERSION:
            spoken = "an unreadable version" if isinstance(request, _Corrupt) else \
                f"protocol version {request.protocol_version}"
            log.warning("client %s speaks %s; refused (this server speaks %d)", cid, spoken, serde.VERSION)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"protocol_version: the client speaks {spoken}, this server speaks protocol version "
                          f"{serde.VERSION} (run the same splitcom version on both sides)")
        try:
            reply = pb.HelloReply(**self.coord.hello(cid))
        except Rejected as err:
            context.abort(getattr(grpc.StatusCode, err.code), str(err))
        self.counters.wire.add(Stream.control, "up", 0 if isinstance(request, _Corrupt) else request.ByteSize())
        self.counters.wire.add(Stream.control, "down", reply.ByteSize())
        return reply

    def Join(self, request, context):  # noqa: N802
        return self._unary("Join", request, context, self.coord.join)

    def PushAdapters(self, request, context):  # noqa: N802
        return self._unary("PushAdapters", request, context, self.coord.push)

    def PullAdapters(self, request, context):  # noqa: N802
        return self._unary("PullAdapters", request, context, self.coord.pull)

    def Heartbeat(self, request, context):  # noqa: N802
        cid = self._authenticate(context)
        reply = pb.HeartbeatReply(**self.coord.heartbeat(cid, -1 if isinstance(request, _Corrupt) else request.round))
        self.counters.wire.add(Stream.control, "up", 0 if isinstance(request, _Corrupt) else request.ByteSize())
        self.counters.wire.add(Stream.control, "down", reply.ByteSize())
        return reply

    def Step(self, request_iterator: Iterator, context):  # noqa: N802
        """Answer every message in order. Labels wait for the act_up that follows them, so both are
        served (and counted) at that step's turn, as in simulation."""
        cid = self._authenticate(context)
        handle = self.coord.stream_opened(cid)
        context.add_callback(lambda: self.coord.stream_closed(cid, handle))
        labels: list[Call] = []
        for request in request_iterator:
            if isinstance(request, _Corrupt):
                log.warning("client %s: corrupt step envelope (%s); ending its stream", cid, request.reason)
                self.counters.wire.add(Stream.control, "up", request.size)
                self.counters.reject("INVALID_ARGUMENT envelope", request.size)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"envelope: not a valid StepRequest ({request.reason})")
            call = self._call("Step", cid, request, context)
            if call.status is None and call.header.type == LABELS:
                try:  # validate now (no state changes), serve with the act_up that follows
                    serde.decode(call.payload)
                except ProtocolError as err:
                    call.reject(INVALID, str(err).removeprefix(f"{err.field}: "), err.field or "payload")
                else:
                    labels.append(call)
                    continue
            if call.status is None:
                try:
                    self.coord.step(call, labels)
                except Rejected as err:
                    call.reject(err.code, str(err).removeprefix(f"{err.field}: "), err.field)
            leftover = [lab for lab in labels if not lab.done.is_set()]
            if leftover:  # a rejected step must not lose its labels: the client sends each label once
                self.coord.labels(leftover)
            for lab in labels:
                yield lab.reply
            labels = []
            yield call.reply


def _handlers(service: SplitComService, counters: Counters) -> grpc.GenericRpcHandler:
    """Method handlers from the service descriptor, with (de)serializers that count gRPC's own bytes
    and never raise on a corrupt request (the handler answers INVALID_ARGUMENT instead)."""
    table = {}
    for method in SERVICE.methods:
        req_cls, rep_cls = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)

        def deserialize(data: bytes, cls=req_cls):
            counters.raw("up", len(data))
            try:
                return cls.FromString(data)
            except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError or others on garbage
                return _Corrupt(len(data), type(err).__name__)

        def serialize(msg, _cls=rep_cls) -> bytes:
            out = msg.SerializeToString()
            counters.raw("down", len(out))
            return out

        behavior = getattr(service, method.name)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming, method.server_streaming)]
        table[method.name] = kind(behavior, request_deserializer=deserialize, response_serializer=serialize)
    return grpc.method_handlers_generic_handler(SERVICE.full_name, table)


def _bind_problem(bind: str) -> str:
    """Why gRPC could not bind (it only says 0): ask the OS the same question."""
    import errno
    import socket

    from splitcom.transport.security import split_address

    host, port = split_address(bind)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            return "address in use (another process listens on that port)"
        if err.errno == errno.EADDRNOTAVAIL:
            return "not an address of this machine"
        return err.strerror or str(err)
    return "the address is not usable"


def start_server(service: SplitComService, bind: str, credentials: grpc.ServerCredentials | None,
                 max_receive_bytes: int, max_workers: int) -> tuple[grpc.Server, int]:
    """Start serving on ``bind``; returns the server and the bound port (``HOST:0`` picks a free one)."""
    options = [("grpc.max_receive_message_length", max_receive_bytes),
               ("grpc.max_send_message_length", max_receive_bytes),
               ("grpc.so_reuseport", 0),  # never share a port with a stale server
               ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
               ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
               ("grpc.keepalive_permit_without_calls", 1)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         options=options)
    server.add_generic_rpc_handlers((_handlers(service, service.counters),))
    try:
        port = (server.add_secure_port(bind, credentials) if credentials is not None
                else server.add_insecure_port(bind))
    except RuntimeError:  # gRPC's message names nothing useful ("set GRPC_VERBOSITY=debug")
        port = 0
    if not port:
        raise UserError(f"cannot listen there: {_bind_problem(bind)}", where=bind)
    server.start()
    return server, port
