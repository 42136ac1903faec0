"""Messages <-> bytes. The same bytes travel in-process and over gRPC, so byte counts agree.

Layout (little-endian). Every message starts with the 16-byte common header::

    magic "SC" (2) | version u8 | type u8 | client_id u32 | step u32 | count u32

then, by type:

- TENSOR (type 1): stream u8 | codec u8 | reserved u16 | hidden u32 | scalar f64      (16 bytes)
  then ``count`` samples, each: sample_id u64 | length u32 | kind u8 | payload_len u32 (17 bytes)
  followed by ``payload_len`` codec bytes (0 for REUSE and SKIP). kind: 0 FULL, 1 REUSE, 2 SKIP.
  So a TENSOR message is 32 + sum_i(17 + payload_i) bytes; fp32 payload_i = T_i * H * 4.
- LABELS (type 2): per sample: sample_id u64 | length u32, then ``length`` int32 labels.
- ADAPTER (type 3): stream u8 | weight f64 | cut u16 | codec u8, then per tensor: name_len u16 |
  name utf-8 | ndim u8 | dims u32 x ndim | codec bytes. ``cut``: the client's cut layer these blocks
  belong to (up: the cut it trained with; down: its cut for the next round, which adaptive cuts may
  have moved). A tensor is coded as a matrix: [d0, d1*d2*...], transposed when it has more rows than
  columns (LoRA B is [out, r]), so the integer codecs' per-row scales run along the long side.
- CONTROL (type 4): kind_len u16 | kind utf-8 | body_len u32 | body JSON utf-8.

Decoding validates every field and raises ProtocolError naming it; it never trusts a length.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import torch

from splitcom.compress.codecs import CODECS, codec_by_code
from splitcom.errors import ProtocolError
from splitcom.protocol.messages import (
    AdapterMsg,
    ControlMsg,
    LabelsMsg,
    Message,
    SampleTensor,
    Stream,
    TensorMsg,
)

MAGIC = b"SC"
VERSION = 2  # 2: ADAPTER carries the client's cut and a codec
HEADER = struct.Struct("<2sBBIII")  # 16 bytes
TENSOR_EXT = struct.Struct("<BBHId")  # 16 bytes
ADAPTER_EXT = struct.Struct("<BdHB")  # 12 bytes
SAMPLE = struct.Struct("<QIBI")  # 17 bytes
LABEL_SAMPLE = struct.Struct("<QI")  # 12 bytes
TENSOR_HEADER_BYTES = HEADER.size + TENSOR_EXT.size  # 32
SAMPLE_HEADER_BYTES = SAMPLE.size  # 17
MAX_MESSAGE_BYTES = 1 << 30  # refuse anything larger before parsing it
TYPES = {TensorMsg: 1, LabelsMsg: 2, AdapterMsg: 3, ControlMsg: 4}
FULL, REUSE, SKIP = 0, 1, 2


def tensor_msg_bytes(lengths: list[int], hidden: int, bytes_per_value: int = 4) -> int:
    """Exact size of a TENSOR message whose samples are all FULL with a fixed-width codec."""
    return TENSOR_HEADER_BYTES + sum(SAMPLE_HEADER_BYTES + t * hidden * bytes_per_value for t in lengths)


def encode(msg: Message) -> bytes:
    kind = TYPES[type(msg)]
    parts: list[bytes] = []
    if isinstance(msg, TensorMsg):
        count = len(msg.samples)
        parts.append(TENSOR_EXT.pack(int(msg.stream), CODECS[msg.codec].code, 0, msg.hidden, msg.scalar))
        for s in msg.samples:
            payload = s.payload or b""
            sample_kind = SKIP if s.skip else REUSE if s.payload is None else FULL
            parts.append(SAMPLE.pack(s.sample_id, s.length, sample_kind, len(payload)))
            parts.append(payload)
    elif isinstance(msg, LabelsMsg):
        count = len(msg.labels)
        for sid, lab in msg.labels.items():
            parts.append(LABEL_SAMPLE.pack(sid, len(lab)))
            parts.append(np.asarray(lab, dtype="<i4").tobytes())
    elif isinstance(msg, AdapterMsg):
        count = len(msg.tensors)
        codec = CODECS[msg.codec]
        parts.append(ADAPTER_EXT.pack(int(msg.stream), msg.weight, msg.cut, codec.code))
        for name, t in msg.tensors.items():
            raw = name.encode()
            parts.append(struct.pack("<H", len(raw)) + raw + struct.pack("<B", t.dim()))
            parts.append(struct.pack(f"<{t.dim()}I", *t.shape))
            rows, cols, transposed = _matrix(tuple(t.shape))
            m = t.detach().to("cpu", torch.float32).reshape((cols, rows) if transposed else (rows, cols))
            parts.append(codec.encode((m.T if transposed else m).contiguous()))
    else:
        raw_kind, body = msg.kind.encode(), json.dumps(msg.body, separators=(",", ":")).encode()
        count = 0
        parts.append(struct.pack("<H", len(raw_kind)) + raw_kind + struct.pack("<I", len(body)) + body)
    step = msg.round if isinstance(msg, AdapterMsg) else msg.step
    return HEADER.pack(MAGIC, VERSION, kind, msg.client_id, step, count) + b"".join(parts)


def _matrix(dims: tuple[int, ...]) -> tuple[int, int, bool]:
    """How an adapter tensor of shape ``dims`` is coded: (rows, cols, transposed)."""
    first, rest = (dims[0], int(np.prod(dims[1:]))) if len(dims) > 1 else (1, int(np.prod(dims)))
    return (rest, first, True) if first > rest else (first, rest, False)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError(f"truncated: needs {n} bytes at offset {self.pos}, "
                                f"{len(self.data) - self.pos} left", field=field)
        out = self.data[self.pos : self.pos + n].tobytes()
        self.pos += n
        return out

    def unpack(self, st: struct.Struct | str, field: str) -> tuple:
        st = struct.Struct(st) if isinstance(st, str) else st
        return st.unpack(self.take(st.size, field))


def decode(data: bytes) -> Message:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}", field="message")
    r = _Reader(data)
    magic, version, kind, client_id, step, count = r.unpack(HEADER, "header")
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}", field="header.magic")
    if version != VERSION:
        raise ProtocolError(f"unsupported version {version}", field="header.version")
    decoders = {1: _decode_tensor, 2: _decode_labels, 3: _decode_adapter, 4: _decode_control}
    if kind not in decoders:
        raise ProtocolError(f"unknown message type {kind}", field="header.type")
    msg = decoders[kind](r, client_id, step, count)
    if r.pos != len(r.data):
        raise ProtocolError(f"{len(r.data) - r.pos} trailing bytes", field="message")
    return msg


def _stream(value: int, allowed: set[Stream], field: str) -> Stream:
    try:
        s = Stream(value)
    except ValueError:
        raise ProtocolError(f"unknown stream {value}", field=field) from None
    if s not in allowed:
        raise ProtocolError(f"stream {s.name} not allowed here", field=field)
    return s


def _decode_tensor(r: _Reader, client_id: int, step: int, count: int) -> TensorMsg:
    stream, code, _, hidden, scalar = r.unpack(TENSOR_EXT, "tensor_header")
    stream = _stream(stream, {Stream.act_up, Stream.grad_down, Stream.act_down, Stream.grad_up}, "stream")
    codec = codec_by_code(code)
    if not math.isfinite(scalar):
        raise ProtocolError(f"non-finite value {scalar}", field="scalar")
    samples = []
    for i in range(count):
        sid, length, kind, plen = r.unpack(SAMPLE, f"samples[{i}]")
        if kind not in (FULL, REUSE, SKIP):
            raise ProtocolError(f"kind {kind} is not FULL, REUSE or SKIP", field=f"samples[{i}].kind")
        if kind != FULL:
            if plen:
                raise ProtocolError("REUSE/SKIP carries a payload", field=f"samples[{i}].payload_len")
            samples.append(SampleTensor(sid, length, None, skip=kind == SKIP))
            continue
        if plen != codec.nbytes(length, hidden):
            raise ProtocolError(f"payload_len {plen} disagrees with length {length} x hidden {hidden} "
                                f"in {codec.name} ({codec.nbytes(length, hidden)})", field=f"samples[{i}].payload_len")
        samples.append(SampleTensor(sid, length, r.take(plen, f"samples[{i}].payload")))
    return TensorMsg(stream, client_id, step, codec.name, hidden, samples, scalar)


def _decode_labels(r: _Reader, client_id: int, step: int, count: int) -> LabelsMsg:
    labels = {}
    for i in range(count):
        sid, length = r.unpack(LABEL_SAMPLE, f"labels[{i}]")
        raw = r.take(4 * length, f"labels[{i}].values")
        labels[sid] = np.frombuffer(raw, dtype="<i4").tolist()
    return LabelsMsg(client_id, step, labels)


def _decode_adapter(r: _Reader, client_id: int, step: int, count: int) -> AdapterMsg:
    stream, weight, cut, code = r.unpack(ADAPTER_EXT, "adapter_header")
    codec = codec_by_code(code)
    stream = _stream(stream, {Stream.adapters_up, Stream.adapters_down}, "stream")
    if not math.isfinite(weight) or weight < 0:
        raise ProtocolError(f"weight {weight} is not a finite non-negative number", field="weight")
    tensors = {}
    for i in range(count):
        (nlen,) = r.unpack("<H", f"tensors[{i}].name_len")
        try:
            name = r.take(nlen, f"tensors[{i}].name").decode()
        except UnicodeDecodeError:
            raise ProtocolError("name is not UTF-8", field=f"tensors[{i}].name") from None
        (ndim,) = r.unpack("<B", f"tensors[{name}].ndim")
        dims = r.unpack(f"<{ndim}I", f"tensors[{name}].dims")
        rows, cols, transposed = _matrix(dims)
        m = codec.decode(r.take(codec.nbytes(rows, cols), f"tensors[{name}].data"), rows, cols)
        tensors[name] = (m.T if transposed else m).reshape(dims).contiguous()
    return AdapterMsg(stream, client_id, step, weight, tensors, cut, codec.name)


def _decode_control(r: _Reader, client_id: int, step: int, count: int) -> ControlMsg:
    (klen,) = r.unpack("<H", "kind_len")
    kind = r.take(klen, "kind").decode(errors="replace")
    (blen,) = r.unpack("<I", "body_len")
    try:
        body = json.loads(r.take(blen, "body").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"not JSON: {err}", field="body") from None
    if not isinstance(body, dict):
        raise ProtocolError("must be a JSON object", field="body")
    return ControlMsg(client_id, step, kind, body)
