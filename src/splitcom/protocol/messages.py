"""Message dataclasses: what the algorithms exchange. They know nothing of bytes or sockets
(serde.py turns them into bytes; transport/ moves the bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch


class Stream(IntEnum):
    """Every message belongs to one stream; byte counters are kept per stream and direction."""

    act_up = 1  # client -> server activations at the cut
    grad_down = 2  # server -> client gradients w.r.t. those activations
    act_down = 3  # U-shape: server -> client activations at the tail cut
    grad_up = 4  # U-shape: client -> server gradients at the tail cut
    labels_up = 5  # client -> server completion labels (standard mode; once per sample)
    adapters_up = 6  # client -> server LoRA matrices for aggregation
    adapters_down = 7  # server -> client aggregated LoRA matrices
    control = 8  # join, pull requests, acknowledgements, errors


DIRECTION = {
    Stream.act_up: "up", Stream.grad_up: "up", Stream.labels_up: "up", Stream.adapters_up: "up",
    Stream.grad_down: "down", Stream.act_down: "down", Stream.adapters_down: "down",
}


@dataclass(frozen=True)
class PrefixRef:
    """Prompt-prefix sharing on a FULL sample (or a DELTA one, ``compression.prefix_refresh``): rows
    ``[0, ref_len)`` are those the receiver keeps under ``ref_key`` (the payload then codes rows
    ``[ref_len, length)`` only, or their change since the held copy), and rows ``[0, own_len)`` of the
    rebuilt tensor are kept under ``own_key`` for later samples. A key is 0 when absent."""

    ref_key: int = 0
    ref_len: int = 0
    own_key: int = 0
    own_len: int = 0


@dataclass
class SampleTensor:
    """One sample's tensor: FULL (codec bytes of [length, hidden], or of its rows after a shared
    prompt prefix when ``prefix`` is set), REUSE (payload None: the receiver substitutes its cached
    copy), DELTA (``delta``: the payload codes ``X - held`` in the message's ``delta_codec``; the
    receiver adds it to its cached copy) or SKIP (payload None, skip=True: no tensor for this sample,
    e.g. no gradient for a reused activation under ``reused_grad=skip``)."""

    sample_id: int
    length: int  # T_i, real tokens of the sample
    payload: bytes | None
    skip: bool = False
    delta: bool = False
    prefix: PrefixRef | None = None

    @property
    def reuse(self) -> bool:
        return self.payload is None and not self.skip


@dataclass
class TensorMsg:
    """A batch of per-sample tensors on one of the four tensor streams."""

    stream: Stream
    client_id: int
    step: int
    codec: str
    hidden: int
    samples: list[SampleTensor]
    scalar: float = 0.0  # e.g. the batch loss on grad_down
    delta_codec: str = "fp32"  # codec of DELTA payloads (compression.temporal.delta_codec)
    entropy: str = "none"  # lossless stage after the codec (compression.entropy)


@dataclass
class LabelsMsg:
    client_id: int
    step: int
    labels: dict[int, list[int]]  # sample id -> per-token labels (IGNORE on the prompt)
    entropy: str = "none"


@dataclass
class AdapterMsg:
    stream: Stream  # adapters_up or adapters_down
    client_id: int
    round: int
    weight: float  # FedAvg weight (the client's sample count)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # canonical name -> fp32 tensor
    cut: int = 0  # the client's cut: up, the one it trained with; down, the one for the next round
    codec: str = "fp32"  # how the matrices travel (compression.adapter_codec); decoded tensors are fp32
    entropy: str = "none"
    base: int = 0  # 0: the tensors are the adapter; else a delta to the adapter state with this digest


@dataclass
class ControlMsg:
    client_id: int
    step: int
    kind: str  # "join", "pull_adapters", "ack", "error", ...
    body: dict = field(default_factory=dict)


Message = TensorMsg | LabelsMsg | AdapterMsg | ControlMsg


def stream_of(msg: Message) -> Stream:
    if isinstance(msg, TensorMsg | AdapterMsg):
        return msg.stream
    if isinstance(msg, LabelsMsg):
        return Stream.labels_up
    return Stream.control
