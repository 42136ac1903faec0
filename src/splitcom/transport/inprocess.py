"""In-process transport: messages go through the same serde as on the network, so byte counts
are identical to what gRPC would carry in its message payloads."""

from __future__ import annotations

from splitcom.errors import ProtocolError
from splitcom.protocol import serde
from splitcom.protocol.messages import DIRECTION, ControlMsg, Message, stream_of
from splitcom.transport.base import Endpoint
from splitcom.transport.counters import ByteCounter


class InProcessChannel:
    def __init__(self, client_id: int, endpoint: Endpoint, counter: ByteCounter):
        self.client_id, self.endpoint, self.counter = client_id, endpoint, counter
        self.up = self.down = 0  # bytes since the last take_bytes(): the simulated clock's input

    def take_bytes(self) -> tuple[int, int]:
        out, self.up, self.down = (self.up, self.down), 0, 0
        return out

    def _deliver(self, msg: Message) -> bytes | None:
        data = serde.encode(msg)
        self.counter.add(stream_of(msg), DIRECTION.get(stream_of(msg), "up"), len(data))
        self.up += len(data)
        return self.endpoint.handle_bytes(self.client_id, data)

    def send(self, msg: Message) -> None:
        self._deliver(msg)

    def request(self, msg: Message) -> Message:
        data = self._deliver(msg)
        if data is None:
            raise ProtocolError("server sent no reply", field="reply")
        reply = serde.decode(data)
        self.down += len(data)
        self.counter.add(stream_of(reply), DIRECTION.get(stream_of(reply), "down"), len(data))
        if isinstance(reply, ControlMsg) and reply.kind == "error":
            raise ProtocolError(reply.body.get("message", "server error"), field=reply.body.get("field"))
        return reply
