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
from gateway.config import ConfigError, ReplicaTlsSettings

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


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _identity(data: bytes) -> bytes:
    return data


def grpc_target(address: str) -> str:
    """grpcio target for a tcp:// or unix:// replica address."""
    if address.startswith("tcp://"):
        return address[len("tcp://") :]
    return address  # unix:///path is understood by grpcio as is


class Channels:
    """grpcio channels to the replicas (probes, fan-out), plain or TLS as the relay's are."""

    def __init__(self, tls: ReplicaTlsSettings | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._credentials: grpc.ChannelCredentials | None = None
        self._options: list[tuple[str, int | str]] = list(_OPTIONS)
        if tls is not None:
            try:
                self._credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(tls.cacert), private_key=_read(tls.key),
                    certificate_chain=_read(tls.cert))
            except OSError as exc:
                raise ConfigError(f"cannot read the TLS files toward replicas: {exc}") from exc
            if tls.servername:
                self._options.append(("grpc.ssl_target_name_override", tls.servername))

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            target = grpc_target(address)
            if self._credentials is None or address.startswith("unix://"):
                channel = grpc.aio.insecure_channel(target, options=self._options)
            else:
                channel = grpc.aio.secure_channel(target, self._credentials,
                                                  options=self._options)
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
