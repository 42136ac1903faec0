"""What the client-side step logic needs from a transport: send, and send-and-wait-for-reply."""

from __future__ import annotations

from typing import Protocol

from splitcom.protocol.messages import Message


class Channel(Protocol):
    """A client's connection to the server. Implementations serialize with protocol.serde and count
    the bytes they move; the algorithms above never see bytes."""

    client_id: int

    def send(self, msg: Message) -> None:
        """Deliver a message that expects no reply (labels, adapters)."""

    def request(self, msg: Message) -> Message:
        """Deliver a message and return the server's reply (activations -> gradients)."""


class Endpoint(Protocol):
    """The server side of a transport: bytes in from an authenticated client id, bytes out."""

    def handle_bytes(self, client_id: int, data: bytes) -> bytes | None: ...
