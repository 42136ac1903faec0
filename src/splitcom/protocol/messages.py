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


@dataclass
class SampleTensor:
    """One sample's tensor: FULL (codec bytes of [length, hidden]), REUSE (payload None: the receiver
    substitutes its cached copy) or SKIP (payload None, skip=True: no tensor for this sample, e.g. no
    gradient for a reused activation under ``reused_grad=skip``)."""

    sample_id: int
    length: int  # T_i, real tokens of the sample
    payload: bytes | None
    skip: bool = False

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


@dataclass
class LabelsMsg:
    client_id: int
    step: int
    labels: dict[int, list[int]]  # sample id -> per-token labels (IGNORE on the prompt)


@dataclass
class AdapterMsg:
    stream: Stream  # adapters_up or adapters_down
    client_id: int
    round: int
    weight: float  # FedAvg weight (the client's sample count)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # canonical name -> fp32 tensor
    cut: int = 0  # the client's cut: up, the one it trained with; down, the one for the next round
    codec: str = "fp32"  # how the matrices travel (compression.adapter_codec); decoded tensors are fp32


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
