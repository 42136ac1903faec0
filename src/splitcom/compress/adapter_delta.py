"""Adapter deltas (``compression.adapter_refresh: delta``): a round's LoRA exchange sends the change
since what the receiver already holds, coded with ``compression.adapter_delta_codec``.

Both ends name an adapter state by a 64-bit digest of its tensors. The receiver of a delta adds it to
the state with that digest; the sender keeps an exact mirror of what the receiver will hold (the same
float32 sum of the same decoded bytes), so the next delta is taken against it and quantisation error
does not pile up. A message without a base (``base == 0``) is the adapter itself, coded with
``compression.adapter_codec``: the first exchange after a cut change, a restart, or whenever the
sender does not hold what the receiver names.

- down (pull): the client names its digest in the request; the server sends ``global - held`` when it
  holds that state with the same matrices, else the global adapter whole.
- up (push): the client sends ``trained - held`` with ``base = digest(held)``; the server adds it to
  the state it keeps under that digest (the last ``KEEP`` it sent that client, so a lost reply does
  not break the next upload); an unknown digest is a ProtocolError naming ``base``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from splitcom.errors import ProtocolError
from splitcom.protocol import serde

KEEP = 2  # states the server keeps per client: the one it last sent, and the one before


def digest(tensors: dict[str, torch.Tensor]) -> int:
    """64-bit digest of names, shapes and fp32 bytes (never 0: 0 means "no base")."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode() + b"\0" + np.asarray(t.shape, dtype="<u4").tobytes())
        h.update(t.numpy().tobytes())
    return int.from_bytes(h.digest(), "little") or 1


def same_layout(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[n].shape == b[n].shape for n in a)


def encode_delta(target: dict[str, torch.Tensor], held: dict[str, torch.Tensor], codec: str
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the delta to send, what the receiver will hold after adding it), bit for bit."""
    delta = {n: target[n].detach().float() - held[n] for n in target}
    return delta, {n: held[n] + serde.adapter_roundtrip(d, codec) for n, d in delta.items()}


def apply_delta(tensors: dict[str, torch.Tensor], held: dict[str, torch.Tensor], who: str
                ) -> dict[str, torch.Tensor]:
    """The receiver's side: ``held + delta`` for every matrix, which must be exactly the held ones."""
    if tensors.keys() != held.keys():
        missing = sorted(held.keys() ^ tensors.keys())
        raise ProtocolError(f"delta for {who} does not cover the held matrices (e.g. {missing[0]})", field="tensors")
    out = {}
    for n, d in tensors.items():
        if d.shape != held[n].shape:
            raise ProtocolError(f"shape {tuple(d.shape)} != held {tuple(held[n].shape)}", field=f"tensors[{n}]")
        out[n] = held[n] + d
    return out


class HeldBySender:
    """The server's mirror of what each client holds: its last ``KEEP`` states by digest."""

    def __init__(self):
        self.states: dict[int, dict[int, dict[str, torch.Tensor]]] = {}

    def put(self, cid: int, tensors: dict[str, torch.Tensor]) -> int:
        key = digest(tensors)
        kept = self.states.setdefault(cid, {})
        kept.pop(key, None)
        kept[key] = tensors
        while len(kept) > KEEP:
            kept.pop(next(iter(kept)))
        return key

    def get(self, cid: int, key: int) -> dict[str, torch.Tensor] | None:
        return self.states.get(cid, {}).get(key)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kept in self.states.values() for st in kept.values()
                   for t in st.values())

    def state_dict(self) -> dict:
        return {cid: list(kept.values()) for cid, kept in self.states.items()}

    def load_state_dict(self, st: dict) -> None:
        self.states = {}
        for cid, states in st.items():
            for tensors in states:
                self.put(int(cid), tensors)
