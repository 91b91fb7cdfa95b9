"""grpcio channels from the gateway to its replicas, for the few calls it makes itself.

Design: one lazily created `grpc.aio` channel per replica address, reused by probes and
fan-outs, with BuildKit's 16 MiB message limits; raw bytes in and out (no message classes), so
responses can be cached and merged without a full schema. Channels of replicas that left the
pool are closed by `retain`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc

from gateway.buildkit.wire import MAX_MESSAGE

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.enable_retries", 0),
    # A replica that is not up yet (a pod starting) puts its channel in reconnect backoff,
    # which grows to 120 s by default: probes of it would fail fast long after it listens.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _identity(data: bytes) -> bytes:
    return data


def grpc_target(address: str) -> str:
    """grpcio target for a tcp:// or unix:// replica address."""
    if address.startswith("tcp://"):
        return address[len("tcp://") :]
    return address  # unix:///path is understood by grpcio as is


class Channels:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(grpc_target(address), options=_OPTIONS)
            self._channels[address] = channel
        return channel

    async def unary(self, address: str, path: str, request: bytes, *, timeout: float) -> bytes:
        call = self.get(address).unary_unary(
            path, request_serializer=_identity, response_deserializer=_identity)
        response: bytes = await call(request, timeout=timeout)
        return response

    async def stream(self, address: str, path: str, request: bytes,
                     *, timeout: float | None) -> AsyncIterator[bytes]:
        call = self.get(address).unary_stream(
            path, request_serializer=_identity, response_deserializer=_identity)
        async for message in call(request, timeout=timeout):
            yield message

    async def retain(self, addresses: Iterable[str]) -> None:
        keep = set(addresses)
        for address in [a for a in self._channels if a not in keep]:
            await self._channels.pop(address).close()

    async def close(self) -> None:
        await self.retain(())
