"""The gateway's own gRPC server: global BuildKit calls answered from caches or by fan-out.

Design: a grpcio aio server on a private unix socket; the relay routes control-class calls to
it like to any replica, so a pool at zero ready replicas or a build still waiting still gets
`ListWorkers`, `Info` and health at once. The relay answers ListWorkers, Info and health Check
itself while the pool has cached answers (control/answers.py: the same answers, without
grpcio's per-call cost); they reach this server only while the pool has none, to wait for
one. Handlers take and return raw bytes:
- ListWorkers: the cached responses of every replica concatenated (protobuf merges repeated
  field 1, so this is the union of worker records); Info: one ready replica's cached answer.
  A pool whose replicas all left answers with its last replica's answers. A pool that no
  replica ever answered for: in a discovered pool (which may be scaled up from zero) the call
  waits for the first answer, at most the pool's queue timeout, and counts as demand meanwhile
  (buildx calls ListWorkers before its Solve, so the build starts the scale-up); in a static
  pool, or past the wait -> UNAVAILABLE (buildx retries that while booting).
- DiskUsage: fanned out to every ready replica, responses concatenated (the union of records).
- Prune: fanned out, the record streams merged as they arrive.
- grpc.health.v1 Check/Watch: SERVING while some replica is ready, else NOT_SERVING.
- ListenBuildHistory the relay could not send to one owner: fanned out, the event streams
  merged, with one `buildkit-current-timestamp` response header of the gateway's own.
- Status and UpdateBuildHistory of a Ref whose owner the gateway does not know: the owner is
  found by fanning out `ListenBuildHistory{Ref, EarlyExit}` (non-owners answer with an empty
  stream at once; Status is never fanned out, since non-owners take 6 s to say NotFound), the
  ledger learns it, and the call is passed to it; no owner -> NOT_FOUND "no such job <ref>".
Every call names its pool in the `x-buildkit-gateway-pool` header the relay adds; only that
pool's replicas answer. A replica that fails during a fan-out is logged and left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from datetime import UTC, datetime

import grpc

from gateway.buildkit import wire
from gateway.builds.ledger import Ledger
from gateway.control.answers import health, pool_answers
from gateway.control.channels import Channels
from gateway.control.probe import CachedAnswers, ReplicaCache
from gateway.replicas.registry import Registry, Replica

POOL_HEADER = "x-buildkit-gateway-pool"
CONTROL = "/moby.buildkit.v1.Control/"
OWNER_LOOKUP_TIMEOUT = 10.0

log = logging.getLogger("gateway.control")

FANOUT_TIMEOUT = 60.0


class ControlServer:
    def __init__(self, registry: Registry, cache: ReplicaCache, channels: Channels,
                 ledger: Ledger, *, first_answer_wait: Mapping[str, float]) -> None:
        self.registry = registry
        self.cache = cache
        self.channels = channels
        self.ledger = ledger
        self.first_answer_wait = first_answer_wait  # pool -> seconds (absent: no wait)
        self.waiting: dict[str, int] = {}  # pool -> calls waiting for a first answer
        self.on_demand: Callable[[str], None] = lambda pool: None
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
            "ListenBuildHistory": grpc.unary_stream_rpc_method_handler(self.listen_history),
            "UpdateBuildHistory": grpc.unary_unary_rpc_method_handler(self.update_history),
            "Status": grpc.unary_stream_rpc_method_handler(self.status),
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

    @staticmethod
    def _pool(context: grpc.aio.ServicerContext) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == POOL_HEADER:
                return str(value)
        return "default"

    def _replicas(self, context: grpc.aio.ServicerContext) -> list[Replica]:
        pool = self._pool(context)
        return [r for r in self.registry.snapshot.replicas if r.pool == pool]

    async def _cached(self, context: grpc.aio.ServicerContext) -> list[CachedAnswers]:
        """Cached answers of the pool's replicas (ready ones first), or the pool's last ones;
        waits for a first answer where the pool allows; aborts UNAVAILABLE without one."""
        pool = self._pool(context)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_answer_wait.get(pool, 0.0)
        counted = False
        try:
            while True:
                answers = pool_answers(self.registry, self.cache, pool)
                if answers:
                    return answers
                if loop.time() >= deadline:
                    break
                if not counted:  # a build about to come: it counts as demand
                    counted = True
                    self.waiting[pool] = self.waiting.get(pool, 0) + 1
                    self.on_demand(pool)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.cache.stored(), deadline - loop.time())
        finally:
            if counted:
                self.waiting[pool] -= 1
                self.on_demand(pool)
        await context.abort(grpc.StatusCode.UNAVAILABLE,
                            "no BuildKit replica has answered the gateway yet")
        raise AssertionError("unreachable")  # abort raises

    async def list_workers(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"".join(a.list_workers for a in await self._cached(context))

    async def info(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return (await self._cached(context))[0].info

    def _health(self, context: grpc.aio.ServicerContext) -> bytes:
        return health(self.registry, self._pool(context))

    async def health_check(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._health(context)

    async def health_watch(self, request: bytes,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield self._health(context)
        await asyncio.Event().wait()  # held open until the client cancels

    # ---- fan-out ---------------------------------------------------------------------------

    def _ready_addresses(self, context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
        return [(r.id, r.address) for r in self._replicas(context) if r.serving]

    async def disk_usage(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        targets = self._ready_addresses(context)
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
        targets = self._ready_addresses(context)
        if not targets:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no ready BuildKit replica")
        async for _rid, record in self._merge(targets, CONTROL + "Prune", request):
            yield record

    async def _merge(self, targets: list[tuple[str, str]], path: str,
                     request: bytes) -> AsyncGenerator[tuple[str, bytes], None]:
        """The server streams of `path` from every target, merged as messages arrive."""
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        method = path.rsplit("/", 1)[-1]

        async def pump(rid: str, addr: str) -> None:
            try:
                async for message in self.channels.stream(addr, path, request, timeout=None):
                    await queue.put((rid, message))
            except grpc.aio.AioRpcError as exc:
                log.warning("fan-out call failed", extra={"replica": rid, "method": method,
                                                          "error": exc.details()})
            except Exception as exc:
                log.warning("fan-out call failed", extra={"replica": rid, "method": method,
                                                          "error": repr(exc)})
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(rid, addr), name=f"{method} {rid}")
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

    # ---- history ---------------------------------------------------------------------------

    async def listen_history(self, request: bytes,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        targets = self._ready_addresses(context)
        if not targets:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no ready BuildKit replica")
        await context.send_initial_metadata((("buildkit-current-timestamp", _now()),))
        ref = wire.decode_ref(request, field=2)
        async for rid, event in self._merge(targets, CONTROL + "ListenBuildHistory", request):
            if ref:
                self.ledger.learn_owner(ref, rid)
            yield event

    async def _owner(self, context: grpc.aio.ServicerContext, ref: str) -> tuple[str, str]:
        """The replica (id, address) whose history has the Ref; aborts NOT_FOUND if none."""
        targets = self._ready_addresses(context)
        probe = wire.history_request(ref=ref, early_exit=True)
        if ref and targets:
            try:
                async with asyncio.timeout(OWNER_LOOKUP_TIMEOUT), contextlib.aclosing(
                        self._merge(targets, CONTROL + "ListenBuildHistory", probe)) as events:
                    async for rid, _event in events:
                        self.ledger.learn_owner(ref, rid)
                        return rid, dict(targets)[rid]
            except TimeoutError:
                pass
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no such job {ref}")
        raise AssertionError("unreachable")  # abort raises

    async def update_history(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        _rid, address = await self._owner(context, wire.decode_ref(request, field=1))
        try:
            return await self.channels.unary(address, CONTROL + "UpdateBuildHistory", request,
                                             timeout=FANOUT_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
            raise

    async def status(self, request: bytes,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        _rid, address = await self._owner(context, wire.decode_ref(request, field=1))
        call = self.channels.get(address).unary_stream(
            CONTROL + "Status", request_serializer=_raw, response_deserializer=_raw)(request)
        try:
            headers = await call.initial_metadata()
            await context.send_initial_metadata(tuple(headers or ()))
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            call.cancel()  # the client left first: so does the owner's stream


def _raw(data: bytes) -> bytes:
    return data


def _now() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond * 1000:09d}Z"
