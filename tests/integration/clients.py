"""Opening client connections to the gateway in either client style."""

from __future__ import annotations

from tests.fakes.grpc_transport import GrpcTransport
from tests.fakes.h2_transport import H2Transport
from tests.fakes.transport import Transport

STYLES = ("grpcio", "grpc-go")


async def connect(style: str, port: int, *, authority: str | None = None) -> Transport:
    if style == "grpcio":
        return GrpcTransport(f"127.0.0.1:{port}", authority=authority)
    return await H2Transport.connect("127.0.0.1", port, authority=authority)
