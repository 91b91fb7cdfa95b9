"""A deliberately naive per-call gRPC proxy: each call goes to the next backend, round-robin.

It is a faithful L7 proxy in every other respect (raw bytes, any path, metadata with repeated
values, response headers, trailers incl. `grpc-status-details-bin`, half-close, cancellation,
16 MiB messages), so with a single backend BuildKit flows pass through it, while with several
backends they break the way buildkit-wire.md predicts ('no active session for ...',
'no such job ...'). That is the proof that the fakes catch misrouting.

Every call is proxied as a bidi stream: at the HTTP/2 level the four call shapes differ only in
how many messages each side sends before END_STREAM, so one pump each way covers all of them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import grpc

MAX_MESSAGE = 16 << 20
MAX_METADATA = 4 << 20
_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_metadata_size", MAX_METADATA),
    ("grpc.absolute_max_metadata_size", MAX_METADATA),
]


def _forwardable(md: Any) -> tuple[tuple[str, str | bytes], ...]:
    """Application metadata only (grpcio adds user-agent and owns the grpc-* keys)."""
    return tuple((k, v) for k, v in (md or ())
                 if not k.startswith(":") and k != "user-agent"
                 and (not k.startswith("grpc-") or k == "grpc-status-details-bin"))


class NaiveRouter:
    """Round-robin per call over `backends` ('host:port' each)."""

    def __init__(self, backends: Sequence[str]) -> None:
        if not backends:
            raise ValueError("need at least one backend")
        self.backends = list(backends)
        self.address = ""
        self.routed: list[tuple[str, str]] = []  # (method path, backend) per call
        self._next = itertools.cycle(range(len(self.backends)))
        self._channels: list[grpc.aio.Channel] = []
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._channels = [
            grpc.aio.insecure_channel(b, options=[*_OPTIONS, ("grpc.use_local_subchannel_pool", 1),
                                                  ("grpc.enable_retries", 0)])
            for b in self.backends]
        server = grpc.aio.server(options=[*_OPTIONS, ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((_Dispatch(self),))
        bound = server.add_insecure_port(f"{host}:{port}")
        await server.start()
        self._server = server
        self.address = f"{host}:{bound}"
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)
        for ch in self._channels:
            await ch.close()
        self._channels = []

    async def __aenter__(self) -> NaiveRouter:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(None)

    async def proxy(self, path: str, requests: Any, context: grpc.aio.ServicerContext) -> None:
        index = next(self._next)
        self.routed.append((path, self.backends[index]))
        remaining = context.time_remaining()
        call = self._channels[index].stream_stream(path)(
            metadata=_forwardable(context.invocation_metadata()), timeout=remaining)

        async def pump_requests() -> None:
            try:
                async for message in requests:
                    await call.write(message)
                await call.done_writing()  # pass the client's half-close through
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the backend already ended the call; its status is relayed below

        pump = asyncio.create_task(pump_requests())
        try:
            headers = _forwardable(await call.initial_metadata())
            if headers:
                await context.send_initial_metadata(headers)
            while (message := await call.read()) is not grpc.aio.EOF:
                await context.write(message)
            code = await call.code()
            trailers = _forwardable(await call.trailing_metadata())
            if code != grpc.StatusCode.OK:
                await context.abort(code, await call.details() or "", trailers)
            context.set_trailing_metadata(trailers)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "", _forwardable(e.trailing_metadata()))
        finally:
            pump.cancel()
            call.cancel()  # client went away (handler cancelled): cancel upstream too


class _Dispatch(grpc.GenericRpcHandler):
    def __init__(self, router: NaiveRouter) -> None:
        self._router = router

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        path = handler_call_details.method

        async def handle(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await self._router.proxy(path, requests, context)

        return grpc.stream_stream_rpc_method_handler(handle)
