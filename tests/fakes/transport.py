"""The call interface the fake BuildKit clients are written against.

Two implementations exist so that every build flow (tests/fakes/buildflow.py) runs over two
independent HTTP/2 stacks: `grpc_transport.GrpcTransport` (grpcio aio, one channel = one HTTP/2
connection) and `h2_transport.H2Transport` (a frame-level client that behaves like grpc-go).
Messages are raw serialized protobuf bytes; metadata is an ordered list of (key, value) pairs,
repeated keys allowed and preserved.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Metadata = Sequence[tuple[str, str]]


@dataclass
class RpcError(Exception):
    """A call that ended with a non-OK grpc-status (or a transport failure: code 14)."""

    code: int  # numeric gRPC status code
    details: str
    trailers: list[tuple[str, bytes]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"rpc error {self.code}: {self.details}"


class BidiCall(Protocol):
    async def send(self, message: bytes) -> None: ...
    async def done_writing(self) -> None:
        """Half-close (END_STREAM from the client)."""
    async def recv(self) -> bytes | None:
        """Next message, or None at a clean end of the stream; raises RpcError on error."""
    def cancel(self) -> None: ...


class Transport(Protocol):
    """One client HTTP/2 connection."""

    async def unary(self, path: str, request: bytes, metadata: Metadata = (),
                    *, timeout: float | None = None) -> bytes: ...

    def server_stream(self, path: str, request: bytes,
                      metadata: Metadata = ()) -> AsyncIterator[bytes]: ...

    async def bidi(self, path: str, metadata: Metadata = ()) -> BidiCall: ...

    async def close(self) -> None: ...
