"""`Transport` over grpcio aio: one insecure channel = one client HTTP/2 connection.

Design
------
* Raw bytes in and out (no serializers); 16 MiB message limits like the BuildKit client.
* `grpc.use_local_subchannel_pool`: grpcio otherwise shares subchannels (TCP connections)
  between channels with the same target and args, so two transports would be one connection.
  Retries, HTTP proxies and service-config lookups are off. Use an IP literal target: a name
  that resolves to several addresses makes pick_first race connection attempts.
* Metadata limits are raised (grpcio's default hard limit for a received header block is
  16 KiB, so a 40 KiB `grpc-status-details-bin` trailer would become RESOURCE_EXHAUSTED).
* `grpc.aio.AioRpcError` becomes `transport.RpcError(code int, details, trailers as bytes)`.
  A call cancelled locally (via `cancel()` from another task) surfaces as RpcError(1, ...)
  instead of grpcio's bare asyncio.CancelledError, so a task reading a call another task
  cancelled is not mistaken for a cancelled task.
* Extras beyond the Protocol (for transparency tests): `unary_full` returns headers and
  trailers of a successful call; `open_server_stream`/`bidi` return `GrpcCall`, which also
  exposes `headers()`, `trailers()` and `code()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from .transport import Metadata, RpcError

MAX_MESSAGE = 16 << 20
MAX_METADATA = 4 << 20
CANCELLED = grpc.StatusCode.CANCELLED.value[0]

MetadataOut = list[tuple[str, str | bytes]]


def _to_grpc_metadata(metadata: Metadata | Sequence[tuple[str, str | bytes]]
                      ) -> tuple[tuple[str, str | bytes], ...]:
    out: list[tuple[str, str | bytes]] = []
    for key, value in metadata:
        if key.endswith("-bin") and isinstance(value, str):
            out.append((key, value.encode()))
        else:
            out.append((key, value))
    return tuple(out)


def _pairs(md: Any) -> MetadataOut:
    return [(k, v) for k, v in (md or ())]


def _bytes_pairs(md: Any) -> list[tuple[str, bytes]]:
    return [(k, v if isinstance(v, bytes) else str(v).encode()) for k, v in (md or ())]


def map_error(e: grpc.aio.AioRpcError) -> RpcError:
    """AioRpcError -> transport.RpcError (trailer values as bytes)."""
    return RpcError(e.code().value[0], e.details() or "", _bytes_pairs(e.trailing_metadata()))


def _locally_cancelled() -> RpcError:
    return RpcError(CANCELLED, "Locally cancelled by application!")


def _own_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass
class UnaryResult:
    response: bytes
    headers: MetadataOut
    trailers: MetadataOut


class GrpcCall:
    """A streaming call (BidiCall protocol plus headers/trailers/code)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def _guard(self, aw: Any) -> Any:
        try:
            return await aw
        except grpc.aio.AioRpcError as e:
            raise map_error(e) from None
        except asyncio.CancelledError:
            if self._call.cancelled() and not _own_task_cancelling():
                raise _locally_cancelled() from None
            self._call.cancel()
            raise
        except asyncio.InvalidStateError as e:  # write after the call ended / half-closed
            code = await self._call.code()
            if code != grpc.StatusCode.OK:
                raise RpcError(code.value[0], await self._call.details() or "",
                               _bytes_pairs(await self._call.trailing_metadata())) from None
            raise RpcError(13, f"invalid call state: {e}") from None

    async def send(self, message: bytes) -> None:
        await self._guard(self._call.write(message))

    async def done_writing(self) -> None:
        """Half-close (END_STREAM)."""
        await self._guard(self._call.done_writing())

    async def recv(self) -> bytes | None:
        msg = await self._guard(self._call.read())
        if msg is grpc.aio.EOF:
            code = await self._call.code()
            if code != grpc.StatusCode.OK:  # grpcio reports some errors as EOF on read()
                raise RpcError(code.value[0], await self._call.details() or "",
                               _bytes_pairs(await self._call.trailing_metadata()))
            return None
        return bytes(msg)

    def cancel(self) -> None:
        self._call.cancel()

    async def headers(self) -> MetadataOut:
        return _pairs(await self._guard(self._call.initial_metadata()))

    async def trailers(self) -> MetadataOut:
        """Trailing metadata (waits for the end of the call)."""
        return _pairs(await self._call.trailing_metadata())

    async def code(self) -> int:
        return int((await self._call.code()).value[0])


class GrpcTransport:
    """One grpc.aio channel (one HTTP/2 connection) speaking raw bytes."""

    def __init__(self, target: str, *, authority: str | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_metadata_size", MAX_METADATA),
            ("grpc.absolute_max_metadata_size", MAX_METADATA),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),
            ("grpc.enable_http_proxy", 0),
            ("grpc.service_config_disable_resolution", 1),
        ]
        if authority is not None:
            opts.append(("grpc.default_authority", authority))
        opts.extend(options)
        self.target = target
        self._channel = grpc.aio.insecure_channel(target, options=opts)

    async def unary(self, path: str, request: bytes, metadata: Metadata = (),
                    *, timeout: float | None = None) -> bytes:
        return (await self.unary_full(path, request, metadata, timeout=timeout)).response

    async def unary_full(self, path: str, request: bytes,
                         metadata: Metadata | Sequence[tuple[str, str | bytes]] = (),
                         *, timeout: float | None = None) -> UnaryResult:
        """A unary call, also returning response headers and trailers."""
        call = self._channel.unary_unary(path)(
            request, metadata=_to_grpc_metadata(metadata), timeout=timeout)
        try:
            response = await call
            headers = await call.initial_metadata()
            trailers = await call.trailing_metadata()
        except grpc.aio.AioRpcError as e:
            raise map_error(e) from None
        except asyncio.CancelledError:
            if call.cancelled() and not _own_task_cancelling():
                raise _locally_cancelled() from None
            call.cancel()
            raise
        return UnaryResult(bytes(response), _pairs(headers), _pairs(trailers))

    def open_server_stream(self, path: str, request: bytes,
                           metadata: Metadata | Sequence[tuple[str, str | bytes]] = ()
                           ) -> GrpcCall:
        """A server-streaming call as a GrpcCall (use recv() until None)."""
        return GrpcCall(self._channel.unary_stream(path)(
            request, metadata=_to_grpc_metadata(metadata)))

    async def server_stream(self, path: str, request: bytes,
                            metadata: Metadata = ()) -> AsyncIterator[bytes]:
        call = self.open_server_stream(path, request, metadata)
        try:
            while (msg := await call.recv()) is not None:
                yield msg
        finally:
            call.cancel()  # no-op when the call already ended

    async def bidi(self, path: str,
                   metadata: Metadata | Sequence[tuple[str, str | bytes]] = ()) -> GrpcCall:
        return GrpcCall(self._channel.stream_stream(path)(
            metadata=_to_grpc_metadata(metadata)))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> GrpcTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
