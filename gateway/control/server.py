"""The gateway's own gRPC server: global BuildKit calls answered from caches or by fan-out.

Design: a grpcio aio server on a private unix socket; the relay routes control-class calls to
it like to any replica, so a pool at zero ready replicas or a build still waiting still gets
`ListWorkers`, `Info` and health at once. Handlers take and return raw bytes:
- ListWorkers: the cached responses of every replica concatenated (protobuf merges repeated
  field 1, so this is the union of worker records); Info: one ready replica's cached answer.
  Never answered by any replica -> UNAVAILABLE (buildx retries that while booting).
- DiskUsage: fanned out to every ready replica, responses concatenated (the union of records).
- Prune: fanned out, the record streams merged as they arrive.
- grpc.health.v1 Check/Watch: SERVING while some replica is ready, else NOT_SERVING.
A replica that fails during a fan-out is logged and left out of the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from gateway.control.channels import Channels
from gateway.control.probe import ReplicaCache
from gateway.replicas.registry import Registry

log = logging.getLogger("gateway.control")

FANOUT_TIMEOUT = 60.0
SERVING = b"\x08\x01"
NOT_SERVING = b"\x08\x02"


class ControlServer:
    def __init__(self, registry: Registry, cache: ReplicaCache, channels: Channels) -> None:
        self.registry = registry
        self.cache = cache
        self.channels = channels
        self.server: grpc.aio.Server | None = None

    async def start(self, socket_path: str) -> None:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.max_send_message_length", 16 << 20),
        ])
        control = "moby.buildkit.v1.Control"
        handlers = {
            "ListWorkers": grpc.unary_unary_rpc_method_handler(self.list_workers),
            "Info": grpc.unary_unary_rpc_method_handler(self.info),
            "DiskUsage": grpc.unary_unary_rpc_method_handler(self.disk_usage),
            "Prune": grpc.unary_stream_rpc_method_handler(self.prune),
        }
        health = {
            "Check": grpc.unary_unary_rpc_method_handler(self.health_check),
            "Watch": grpc.unary_stream_rpc_method_handler(self.health_watch),
        }
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(control, handlers),
            grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
        ))
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)

    # ---- cached answers --------------------------------------------------------------------

    def _cached(self) -> list[tuple[str, bool]]:
        """Replica ids with cached answers, ready ones first."""
        snap = self.registry.snapshot
        ids = [r.id for r in snap.replicas if r.id in self.cache.answers]
        return sorted(((i, snap.by_id[i].placeable) for i in ids), key=lambda p: not p[1])

    async def list_workers(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        cached = self._cached()
        if not cached:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no BuildKit replica has answered the gateway yet")
        return b"".join(self.cache.answers[i].list_workers for i, _ready in cached)

    async def info(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        cached = self._cached()
        if not cached:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no BuildKit replica has answered the gateway yet")
        return self.cache.answers[cached[0][0]].info

    def _health(self) -> bytes:
        return SERVING if any(r.placeable for r in self.registry.snapshot.replicas) else NOT_SERVING

    async def health_check(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._health()

    async def health_watch(self, request: bytes,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield self._health()
        await asyncio.Event().wait()  # held open until the client cancels

    # ---- fan-out ---------------------------------------------------------------------------

    def _ready_addresses(self) -> list[tuple[str, str]]:
        return [(r.id, r.address) for r in self.registry.snapshot.replicas if r.placeable]

    async def disk_usage(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        targets = self._ready_addresses()
        if not targets:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no ready BuildKit replica")
        results = await asyncio.gather(
            *(self.channels.unary(addr, "/moby.buildkit.v1.Control/DiskUsage", request,
                                  timeout=FANOUT_TIMEOUT) for _id, addr in targets),
            return_exceptions=True)
        parts: list[bytes] = []
        for (rid, _addr), result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("fan-out call failed", extra={"replica": rid, "method": "DiskUsage",
                                                          "error": str(result)})
            else:
                parts.append(result)
        return b"".join(parts)

    async def prune(self, request: bytes,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        targets = self._ready_addresses()
        if not targets:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no ready BuildKit replica")
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def pump(rid: str, addr: str) -> None:
            try:
                async for record in self.channels.stream(
                        addr, "/moby.buildkit.v1.Control/Prune", request, timeout=None):
                    await queue.put(record)
            except grpc.aio.AioRpcError as exc:
                log.warning("fan-out call failed", extra={"replica": rid, "method": "Prune",
                                                          "error": exc.details()})
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(rid, addr), name=f"prune {rid}")
                 for rid, addr in targets]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
