"""Messages <-> bytes. The same bytes travel in-process and over gRPC, so byte counts agree.

Layout (little-endian). Every message starts with the 16-byte common header::

    magic "SC" (2) | version u8 | type u8 | client_id u32 | step u32 | count u32

then a fixed extension by type, then the body. The extension's ``entropy`` byte says whether the body
travels as is (0) or as one zstd frame (1, ``compression.entropy=zstd``); the header and extension are
never compressed, so a transport can peek at the stream, the weight or the loss without decoding.

- TENSOR (type 1): stream u8 | codec u8 | delta_codec u8 | entropy u8 | hidden u32 | scalar f64 (16 bytes)
  then ``count`` samples, each: sample_id u64 | length u32 | kind u8 | payload_len u32 (17 bytes)
  followed by ``payload_len`` bytes. kind: 0 FULL (codec bytes of [length, hidden]), 1 REUSE and
  2 SKIP (no payload), 3 DELTA (delta_codec bytes of X - held), 4 PREFIX (ref_key u64 | ref_len u32 |
  own_key u64 | own_len u32, then codec bytes of rows [ref_len, length)), 5 DELTA after a PREFIX (the
  same 24 bytes, then delta_codec bytes of rows [ref_len, length) minus the held copy's rows;
  ``compression.prefix_refresh``; a peer older than it names kind 5 as unknown).
  So an uncompressed TENSOR message is 32 + sum_i(17 + payload_i) bytes; fp32 payload_i = T_i * H * 4.
- LABELS (type 2): entropy u8; per sample: sample_id u64 | length u32, then ``length`` int32 labels.
- ADAPTER (type 3): stream u8 | weight f64 | cut u16 | codec u8 | entropy u8 | base u64, then per tensor:
  name_len u16 | name utf-8 | ndim u8 | dims u32 x ndim | codec bytes. ``cut``: the client's cut layer
  these blocks belong to (up: the cut it trained with; down: its cut for the next round, which
  adaptive cuts may have moved). A tensor is coded as a matrix: [d0, d1*d2*...], transposed when it
  has more rows than columns (LoRA B is [out, r]), so the integer codecs' per-row scales run along the
  long side. ``base``: 0 when the tensors are the adapter itself; else they are a difference to add
  to the adapter state with that digest (compress/adapter_delta.py, ``compression.adapter_refresh``).
- CONTROL (type 4): kind_len u16 | kind utf-8 | body_len u32 | body JSON utf-8.

Decoding validates every field and raises ProtocolError naming it; it never trusts a length.
"""

from __future__ import annotations

import json
import math
import struct
import threading

import numpy as np
import torch
import zstandard

from splitcom.compress.codecs import CODECS, codec_by_code
from splitcom.errors import ProtocolError
from splitcom.protocol.messages import (
    AdapterMsg,
    ControlMsg,
    LabelsMsg,
    Message,
    PrefixRef,
    SampleTensor,
    Stream,
    TensorMsg,
)

MAGIC = b"SC"
VERSION = 4  # 2: ADAPTER carries the client's cut and a codec; 3: DELTA/PREFIX samples, entropy byte;
#              4: ADAPTER base digest (adapter deltas)
HEADER = struct.Struct("<2sBBIII")  # 16 bytes
TENSOR_EXT = struct.Struct("<BBBBId")  # 16 bytes
ADAPTER_EXT = struct.Struct("<BdHBBQ")  # 21 bytes
LABELS_EXT = struct.Struct("<B")  # 1 byte
SAMPLE = struct.Struct("<QIBI")  # 17 bytes
PREFIX = struct.Struct("<QIQI")  # 24 bytes, at the start of a PREFIX payload
LABEL_SAMPLE = struct.Struct("<QI")  # 12 bytes
TENSOR_HEADER_BYTES = HEADER.size + TENSOR_EXT.size  # 32
SAMPLE_HEADER_BYTES = SAMPLE.size  # 17
MAX_MESSAGE_BYTES = 1 << 30  # refuse anything larger before parsing it (compressed or not)
TYPES = {TensorMsg: 1, LabelsMsg: 2, AdapterMsg: 3, ControlMsg: 4}
FULL, REUSE, SKIP, DELTA, PREFIXED, PREFIXED_DELTA = 0, 1, 2, 3, 4, 5
ENTROPY = {"none": 0, "zstd": 1}
ENTROPY_BY_CODE = {v: k for k, v in ENTROPY.items()}
ZSTD_LEVEL = 3  # zstd's own default: most of the gain of level 19 at a small fraction of its time
_local = threading.local()  # zstd (de)compressor objects are not safe to share between threads


def _zstd_c() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "c"):
        _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True)
    return _local.c


def _entropy_code(name: str) -> int:
    if name not in ENTROPY:
        raise ProtocolError(f"unknown entropy coder {name!r}; known: {sorted(ENTROPY)}", field="entropy")
    return ENTROPY[name]


def tensor_msg_bytes(lengths: list[int], hidden: int, bytes_per_value: int = 4) -> int:
    """Exact size of a TENSOR message whose samples are all FULL with a fixed-width codec."""
    return TENSOR_HEADER_BYTES + sum(SAMPLE_HEADER_BYTES + t * hidden * bytes_per_value for t in lengths)


def encode(msg: Message) -> bytes:
    kind = TYPES[type(msg)]
    parts: list[bytes] = []
    entropy = getattr(msg, "entropy", "none")
    if isinstance(msg, TensorMsg):
        count = len(msg.samples)
        ext = TENSOR_EXT.pack(int(msg.stream), CODECS[msg.codec].code, CODECS[msg.delta_codec].code,
                              _entropy_code(entropy), msg.hidden, msg.scalar)
        for s in msg.samples:
            payload = s.payload or b""
            if s.prefix is not None:
                p = s.prefix
                payload = PREFIX.pack(p.ref_key, p.ref_len, p.own_key, p.own_len) + payload
            sample_kind = SKIP if s.skip else REUSE if s.payload is None else \
                (PREFIXED_DELTA if s.prefix is not None else DELTA) if s.delta else \
                PREFIXED if s.prefix is not None else FULL
            parts.append(SAMPLE.pack(s.sample_id, s.length, sample_kind, len(payload)))
            parts.append(payload)
    elif isinstance(msg, LabelsMsg):
        count = len(msg.labels)
        ext = LABELS_EXT.pack(_entropy_code(entropy))
        for sid, lab in msg.labels.items():
            parts.append(LABEL_SAMPLE.pack(sid, len(lab)))
            parts.append(np.asarray(lab, dtype="<i4").tobytes())
    elif isinstance(msg, AdapterMsg):
        count = len(msg.tensors)
        codec = CODECS[msg.codec]
        ext = ADAPTER_EXT.pack(int(msg.stream), msg.weight, msg.cut, codec.code, _entropy_code(entropy), msg.base)
        for name, t in msg.tensors.items():
            raw = name.encode()
            parts.append(struct.pack("<H", len(raw)) + raw + struct.pack("<B", t.dim()))
            parts.append(struct.pack(f"<{t.dim()}I", *t.shape))
            parts.append(_code_adapter_tensor(t, codec))
    else:
        raw_kind, body = msg.kind.encode(), json.dumps(msg.body, separators=(",", ":")).encode()
        count, ext, entropy = 0, b"", "none"
        parts.append(struct.pack("<H", len(raw_kind)) + raw_kind + struct.pack("<I", len(body)) + body)
    body = b"".join(parts)
    if entropy == "zstd":
        body = _zstd_c().compress(body)
    step = msg.round if isinstance(msg, AdapterMsg) else msg.step
    return HEADER.pack(MAGIC, VERSION, kind, msg.client_id, step, count) + ext + body


def _code_adapter_tensor(t: torch.Tensor, codec) -> bytes:
    rows, cols, transposed = _matrix(tuple(t.shape))
    m = t.detach().to("cpu", torch.float32).reshape((cols, rows) if transposed else (rows, cols))
    return codec.encode((m.T if transposed else m).contiguous())


def _decode_adapter_tensor(data: bytes, dims: tuple[int, ...], codec) -> torch.Tensor:
    rows, cols, transposed = _matrix(dims)
    m = codec.decode(data, rows, cols)
    return (m.T if transposed else m).reshape(dims).contiguous()


def adapter_nbytes(dims: tuple[int, ...], codec) -> int:
    rows, cols, _ = _matrix(dims)
    return codec.nbytes(rows, cols)


def adapter_roundtrip(t: torch.Tensor, codec: str) -> torch.Tensor:
    """The fp32 tensor a receiver decodes from an ADAPTER message carrying ``t`` with ``codec``."""
    c = CODECS[codec]
    return _decode_adapter_tensor(_code_adapter_tensor(t, c), tuple(t.shape), c)


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
    msg, body = decoders[kind](r, client_id, step, count)
    if body.pos != len(body.data):
        raise ProtocolError(f"{len(body.data) - body.pos} trailing bytes", field="message")
    return msg


def _body(r: _Reader, code: int) -> tuple[_Reader, str]:
    """The rest of the message as a reader: as is, or out of its zstd frame."""
    if code not in ENTROPY_BY_CODE:
        raise ProtocolError(f"unknown entropy code {code}; known: {sorted(ENTROPY_BY_CODE)}", field="entropy")
    if code == 0:
        return r, "none"
    frame = r.take(len(r.data) - r.pos, "payload.zstd")
    try:
        size = zstandard.frame_content_size(frame)
        if size < 0 or size > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"zstd frame declares {size} bytes (unknown or over {MAX_MESSAGE_BYTES})",
                                field="payload.zstd")
        if not hasattr(_local, "d"):
            _local.d = zstandard.ZstdDecompressor()
        data = _local.d.decompress(frame, max_output_size=size)
    except zstandard.ZstdError as err:
        raise ProtocolError(f"corrupt zstd frame: {err}", field="payload.zstd") from None
    if len(data) != size:
        raise ProtocolError(f"zstd frame holds {len(data)} bytes, declares {size}", field="payload.zstd")
    return _Reader(data), "zstd"


def _stream(value: int, allowed: set[Stream], field: str) -> Stream:
    try:
        s = Stream(value)
    except ValueError:
        raise ProtocolError(f"unknown stream {value}", field=field) from None
    if s not in allowed:
        raise ProtocolError(f"stream {s.name} not allowed here", field=field)
    return s


def _decode_tensor(r: _Reader, client_id: int, step: int, count: int) -> tuple[TensorMsg, _Reader]:
    stream, code, delta_code, entropy, hidden, scalar = r.unpack(TENSOR_EXT, "tensor_header")
    stream = _stream(stream, {Stream.act_up, Stream.grad_down, Stream.act_down, Stream.grad_up}, "stream")
    codec, delta_codec = codec_by_code(code), codec_by_code(delta_code, field="delta_codec")
    if not math.isfinite(scalar):
        raise ProtocolError(f"non-finite value {scalar}", field="scalar")
    r, entropy = _body(r, entropy)
    samples = []
    for i in range(count):
        sid, length, kind, plen = r.unpack(SAMPLE, f"samples[{i}]")
        where = f"samples[{i}]"
        if kind in (REUSE, SKIP):
            if plen:
                raise ProtocolError("REUSE/SKIP carries a payload", field=f"{where}.payload_len")
            samples.append(SampleTensor(sid, length, None, skip=kind == SKIP))
        elif kind in (FULL, DELTA):
            c = codec if kind == FULL else delta_codec
            _expect(plen, c.nbytes(length, hidden), f"length {length} x hidden {hidden} in {c.name}", where)
            samples.append(SampleTensor(sid, length, r.take(plen, f"{where}.payload"), delta=kind == DELTA))
        elif kind in (PREFIXED, PREFIXED_DELTA):
            ref_key, ref_len, own_key, own_len = r.unpack(PREFIX, f"{where}.prefix")
            if ref_len > length or own_len > length or (ref_len and not ref_key) or (own_len and not own_key):
                raise ProtocolError(f"prefix lengths ref {ref_len} / own {own_len} do not fit length {length} "
                                    "(or a length without its key)", field=f"{where}.prefix")
            c = codec if kind == PREFIXED else delta_codec
            n = c.nbytes(length - ref_len, hidden)
            _expect(plen, PREFIX.size + n, f"{PREFIX.size} + rows {length - ref_len} x hidden {hidden} in "
                    f"{c.name}", where)
            samples.append(SampleTensor(sid, length, r.take(n, f"{where}.payload"), delta=kind == PREFIXED_DELTA,
                                        prefix=PrefixRef(ref_key, ref_len, own_key, own_len)))
        else:
            raise ProtocolError(f"kind {kind} is not FULL, REUSE, SKIP, DELTA, PREFIX or PREFIX+DELTA",
                                field=f"{where}.kind")
    return TensorMsg(stream, client_id, step, codec.name, hidden, samples, scalar, delta_codec.name, entropy), r


def _expect(plen: int, want: int, what: str, where: str) -> None:
    if plen != want:
        raise ProtocolError(f"payload_len {plen} disagrees with {what} ({want})", field=f"{where}.payload_len")


def _decode_labels(r: _Reader, client_id: int, step: int, count: int) -> tuple[LabelsMsg, _Reader]:
    (entropy,) = r.unpack(LABELS_EXT, "labels_header")
    r, entropy = _body(r, entropy)
    labels = {}
    for i in range(count):
        sid, length = r.unpack(LABEL_SAMPLE, f"labels[{i}]")
        raw = r.take(4 * length, f"labels[{i}].values")
        labels[sid] = np.frombuffer(raw, dtype="<i4").tolist()
    return LabelsMsg(client_id, step, labels, entropy), r


def _decode_adapter(r: _Reader, client_id: int, step: int, count: int) -> tuple[AdapterMsg, _Reader]:
    stream, weight, cut, code, entropy, base = r.unpack(ADAPTER_EXT, "adapter_header")
    codec = codec_by_code(code)
    stream = _stream(stream, {Stream.adapters_up, Stream.adapters_down}, "stream")
    if not math.isfinite(weight) or weight < 0:
        raise ProtocolError(f"weight {weight} is not a finite non-negative number", field="weight")
    r, entropy = _body(r, entropy)
    tensors = {}
    for i in range(count):
        (nlen,) = r.unpack("<H", f"tensors[{i}].name_len")
        try:
            name = r.take(nlen, f"tensors[{i}].name").decode()
        except UnicodeDecodeError:
            raise ProtocolError("name is not UTF-8", field=f"tensors[{i}].name") from None
        (ndim,) = r.unpack("<B", f"tensors[{name}].ndim")
        dims = r.unpack(f"<{ndim}I", f"tensors[{name}].dims")
        data = r.take(adapter_nbytes(dims, codec), f"tensors[{name}].data")
        tensors[name] = _decode_adapter_tensor(data, dims, codec)
    return AdapterMsg(stream, client_id, step, weight, tensors, cut, codec.name, entropy, base), r


def _decode_control(r: _Reader, client_id: int, step: int, count: int) -> tuple[ControlMsg, _Reader]:
    (klen,) = r.unpack("<H", "kind_len")
    kind = r.take(klen, "kind").decode(errors="replace")
    (blen,) = r.unpack("<I", "body_len")
    try:
        body = json.loads(r.take(blen, "body").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"not JSON: {err}", field="body") from None
    if not isinstance(body, dict):
        raise ProtocolError("must be a JSON object", field="body")
    return ControlMsg(client_id, step, kind, body), r
