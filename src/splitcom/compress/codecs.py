"""Tensor codecs for one sample's ``[T, H]`` activation or gradient, with exact byte sizes.

Integer codecs use per-token (per-row) absmax scales stored as fp32: int8 keeps 127 levels per
sign, int4 keeps 7 and packs two values per byte (low nibble first), int2 keeps {-1, 0, 1} and packs
four values per byte (lowest bits first); int2 is meant for residuals (DELTA refreshes, adapter deltas). Pure functions: a codec maps a
tensor to bytes and back; the byte count on the wire is ``len(encode(x))`` and equals ``nbytes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from splitcom.errors import ProtocolError


class Codec(ABC):
    name: str
    code: int  # one byte on the wire

    @abstractmethod
    def nbytes(self, t: int, h: int) -> int: ...

    @abstractmethod
    def encode(self, x: torch.Tensor) -> bytes: ...

    @abstractmethod
    def _decode(self, data: bytes, t: int, h: int) -> torch.Tensor: ...

    def decode(self, data: bytes, t: int, h: int) -> torch.Tensor:
        """bytes -> fp32 [T, H]; a length that disagrees with T and H is a protocol error."""
        if len(data) != self.nbytes(t, h):
            raise ProtocolError(f"{self.name} payload of {len(data)} bytes, expected {self.nbytes(t, h)} "
                                f"for shape [{t}, {h}]", field="payload")
        return self._decode(data, t, h)


class _Float(Codec):
    def __init__(self, name: str, code: int, dtype: torch.dtype):
        self.name, self.code, self.dtype = name, code, dtype
        self.width = torch.tensor([], dtype=dtype).element_size()

    def nbytes(self, t, h):
        return t * h * self.width

    def encode(self, x):
        y = x.detach().to("cpu", self.dtype).contiguous()
        if self.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit words
            y = y.view(torch.int16)
        return y.numpy().tobytes()

    def _decode(self, data, t, h):
        if self.dtype == torch.bfloat16:
            raw = torch.from_numpy(np.frombuffer(data, dtype=np.int16).copy())
            return raw.view(torch.bfloat16).reshape(t, h).float()
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[self.dtype]
        return torch.from_numpy(np.frombuffer(data, dtype=np_dtype).copy()).reshape(t, h).float()


class _Int(Codec):
    """Symmetric per-token quantisation: q = round(x / s), s = absmax(row) / qmax."""

    def __init__(self, name: str, code: int, bits: int):
        self.name, self.code, self.bits = name, code, bits
        self.qmax = 2 ** (bits - 1) - 1

    def nbytes(self, t, h):
        per_byte = 8 // self.bits
        return 4 * t + (t * h + per_byte - 1) // per_byte  # fp32 scale per token, then the packed values

    def encode(self, x):
        x = x.detach().to("cpu", torch.float32)
        scale = x.abs().amax(dim=1) / self.qmax  # [T]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(x / scale[:, None]), -self.qmax, self.qmax).to(torch.int8).numpy()
        if self.bits < 8:
            per_byte, mask = 8 // self.bits, (1 << self.bits) - 1
            flat = (q.reshape(-1) & mask).astype(np.uint8)
            flat = np.append(flat, np.zeros(-flat.size % per_byte, dtype=np.uint8)).reshape(-1, per_byte)
            q = np.zeros(flat.shape[0], dtype=np.uint8)
            for j in range(per_byte):  # value j of each byte sits at bits [j*bits, (j+1)*bits)
                q |= flat[:, j] << (j * self.bits)
        return scale.numpy().astype(np.float32).tobytes() + q.tobytes()

    def _decode(self, data, t, h):
        scale = np.frombuffer(data, dtype=np.float32, count=t)
        body = np.frombuffer(data, dtype=np.uint8, offset=4 * t)
        if self.bits == 8:
            q = body.view(np.int8).astype(np.float32)
        else:
            per_byte, mask, half = 8 // self.bits, (1 << self.bits) - 1, 1 << (self.bits - 1)
            vals = np.empty((body.size, per_byte), dtype=np.int16)
            for j in range(per_byte):
                vals[:, j] = (body >> (j * self.bits)) & mask
            vals = vals.reshape(-1)[: t * h]
            q = np.where(vals >= half, vals - (1 << self.bits), vals).astype(np.float32)  # sign-extend
        return torch.from_numpy(q.reshape(t, h) * scale[:, None])


CODECS: dict[str, Codec] = {c.name: c for c in (
    _Float("fp32", 0, torch.float32), _Float("fp16", 1, torch.float16), _Float("bf16", 2, torch.bfloat16),
    _Int("int8", 3, 8), _Int("int4", 4, 4), _Int("int2", 5, 2),
)}
BY_CODE: dict[int, Codec] = {c.code: c for c in CODECS.values()}


def get_codec(name: str) -> Codec:
    return CODECS[name]


def codec_by_code(code: int, field: str = "codec") -> Codec:
    if code not in BY_CODE:
        raise ProtocolError(f"unknown codec code {code}; known: {sorted(BY_CODE)}", field=field)
    return BY_CODE[code]
