"""Tensor codecs for one sample's ``[T, H]`` activation or gradient, with exact byte sizes.

Integer codecs use per-token (per-row) absmax scales stored as fp32: int8 keeps 127 levels per
sign, int4 keeps 7 and packs two values per byte (low nibble first), int2 keeps {-1, 0, 1} and packs
four values per byte (lowest bits first); int2 is meant for residuals (DELTA refreshes, adapter deltas).
``sign1`` keeps one bit per value, the sign, times the row's mean absolute value (the scale that
minimises the squared error of a sign code); with DELTA refreshes the sender's exact mirror carries each
error into the next residual, which makes it error-feedback sign compression (Karimireddy et al., 2019,
"Error feedback fixes SignSGD"). Pure functions: a codec maps a tensor to bytes and back; the byte count
on the wire is ``len(encode(x))`` and equals ``nbytes``.

``int8o``, ``int4o``, ``int2o``, ``sign1o``: the same codes after taking out each row's ``OUTLIERS``
largest-magnitude values, which travel exactly (u16 column, fp32 value). LLM hidden states carry a few
"massive activation" channels (SmolLM2's layer-28 output: one channel at ~3e3 where the median channel
is ~17), so a per-token absmax step set by them rounds every ordinary channel away: int8 of that
act_down keeps 38 % relative error on the other channels, int8o 1.2 % (LLM.int8()'s outlier split,
Dettmers et al. 2022, done per row).

``int4s``, ``int2s``: int4 / int2 with stochastic rounding (QSGD, Alistarh et al., 2017): each value
rounds up with probability equal to its distance from the step below, so the decoded tensor is an unbiased
estimate of the input. Nearest rounding is biased where a row is heavy-tailed: int2 turns every value under
half the row's absmax into 0, and a backward gradient sent so loses most of its small values on every step
(bench/results/stream_distortion.md). Measured there on grad_down, stochastic int2 distorts a step about
as much as nearest int2 (head-gradient cosine 0.59 against 0.56): its variance replaces the bias. The dither
is drawn from a generator seeded with a CRC of the scaled values, so encode stays a pure function: the same
tensor gives the same bytes in simulation, in deployment and after a resume. Decoding is the
nearest-rounding codec's.
"""

from __future__ import annotations

import zlib
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

    def __init__(self, name: str, code: int, bits: int, stochastic: bool = False):
        self.name, self.code, self.bits, self.stochastic = name, code, bits, stochastic
        self.qmax = 2 ** (bits - 1) - 1

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        if not self.stochastic:
            return torch.round(v)
        # floor(v + u), u ~ U[0, 1): E = v. Seeded by the input so the same tensor gives the same bytes.
        u = np.random.default_rng(zlib.crc32(v.numpy().tobytes())).random(v.shape, dtype=np.float32)
        return torch.floor(v + torch.from_numpy(u))

    def nbytes(self, t, h):
        per_byte = 8 // self.bits
        return 4 * t + (t * h + per_byte - 1) // per_byte  # fp32 scale per token, then the packed values

    def encode(self, x):
        x = x.detach().to("cpu", torch.float32)
        scale = x.abs().amax(dim=1) / self.qmax  # [T]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(self._round(x / scale[:, None]), -self.qmax, self.qmax).to(torch.int8).numpy()
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


class _Sign(Codec):
    """One bit per value (1 = non-negative), eight a byte, lowest bit first; per-row fp32 scale mean|x|."""

    name, code = "sign1", 6

    def nbytes(self, t, h):
        return 4 * t + (t * h + 7) // 8

    def encode(self, x):
        x = x.detach().to("cpu", torch.float32)
        scale = x.abs().mean(dim=1).numpy().astype(np.float32)  # [T]; 0 for an all-zero row
        return scale.tobytes() + np.packbits((x >= 0).numpy().reshape(-1), bitorder="little").tobytes()

    def _decode(self, data, t, h):
        scale = np.frombuffer(data, dtype=np.float32, count=t)
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=4 * t), count=t * h, bitorder="little")
        signs = bits.astype(np.float32).reshape(t, h) * 2 - 1
        return torch.from_numpy(signs * scale[:, None])


OUTLIERS = 4  # values per row kept exactly by the `...o` codecs


class _Outliers(Codec):
    """``base`` on the row without its ``OUTLIERS`` largest |x|, then their columns (u16) and values (fp32)."""

    def __init__(self, base: Codec, code: int):
        self.base, self.name, self.code = base, base.name + "o", code

    def nbytes(self, t, h):
        return self.base.nbytes(t, h) + t * min(OUTLIERS, h) * 6

    def encode(self, x):
        x = x.detach().to("cpu", torch.float32)
        if x.shape[1] > 65536:
            raise ValueError(f"{self.name}: rows of {x.shape[1]} values do not fit u16 columns")
        idx = x.abs().topk(min(OUTLIERS, x.shape[1]), dim=1).indices  # [T, k]
        vals = x.gather(1, idx)
        rest = x.scatter(1, idx, 0.0)
        return self.base.encode(rest) + idx.numpy().astype(np.uint16).tobytes() + vals.numpy().tobytes()

    def _decode(self, data, t, h):
        k, n = min(OUTLIERS, h), self.base.nbytes(t, h)
        idx = np.frombuffer(data, dtype=np.uint16, count=t * k, offset=n).astype(np.int64).reshape(t, k)
        if idx.size and idx.max() >= h:
            raise ProtocolError(f"{self.name} outlier column {int(idx.max())} >= row width {h}", field="payload")
        vals = np.frombuffer(data, dtype=np.float32, count=t * k, offset=n + 2 * t * k).reshape(t, k)
        y = self.base._decode(data[:n], t, h)
        return y.scatter(1, torch.from_numpy(idx), torch.from_numpy(vals.copy()))


_BASE = (_Float("fp32", 0, torch.float32), _Float("fp16", 1, torch.float16), _Float("bf16", 2, torch.bfloat16),
         _Int("int8", 3, 8), _Int("int4", 4, 4), _Int("int2", 5, 2), _Sign(),
         _Int("int4s", 11, 4, stochastic=True), _Int("int2s", 12, 2, stochastic=True))
_BY_NAME = {c.name: c for c in _BASE}
CODECS: dict[str, Codec] = {c.name: c for c in (*_BASE, *(
    _Outliers(_BY_NAME[b], code) for b, code in (("int8", 7), ("int4", 8), ("int2", 9), ("sign1", 10))))}
BY_CODE: dict[int, Codec] = {c.code: c for c in CODECS.values()}


def get_codec(name: str) -> Codec:
    return CODECS[name]


def codec_by_code(code: int, field: str = "codec") -> Codec:
    if code not in BY_CODE:
        raise ProtocolError(f"unknown codec code {code}; known: {sorted(BY_CODE)}", field=field)
    return BY_CODE[code]
