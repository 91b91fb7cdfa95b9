"""Opening client connections to the gateway in either client style."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from tests.fakes.grpc_transport import GrpcTransport
from tests.fakes.h2_transport import H2Transport
from tests.fakes.transport import Transport

STYLES = ("grpcio", "grpc-go")


async def connect(style: str, port: int, *, authority: str | None = None) -> Transport:
    if style == "grpcio":
        return GrpcTransport(f"127.0.0.1:{port}", authority=authority)
    return await H2Transport.connect("127.0.0.1", port, authority=authority)


@contextlib.asynccontextmanager
async def client(style: str, port: int, *, authority: str | None = None
                 ) -> AsyncIterator[Transport]:
    """One client connection, closed at the end of the block."""
    t = await connect(style, port, authority=authority)
    try:
        yield t
    finally:
        await t.close()
