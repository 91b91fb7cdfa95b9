"""Admission end to end: slots per replica, a FIFO queue per pool, the wait in progress."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable

from gateway.app import Gateway
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import node_id
from tests.fakes.replica import CallRecord, FakeReplica
from tests.integration.clients import connect

WAIT = "[gateway] waiting for a builder"


class QueueWatch:
    """Records the admission queue of a running gateway through the hub's own entry points."""

    def __init__(self, gw: Gateway) -> None:
        assert gw.hub is not None
        self.hub = gw.hub
        self.enqueued: list[str] = []
        self.admitted: list[str] = []
        self.peak = 0
        self.changed = asyncio.Event()
        enqueue, dequeue, start = self.hub.enqueue, self.hub.dequeue, self.hub.ledger.start

        def on_enqueue(pool, waiter):  # type: ignore[no-untyped-def]
            refused = enqueue(pool, waiter)
            if refused is None:
                self.enqueued.append(waiter.ref)
                self.peak = max(self.peak, self.hub.queued())
            self.changed.set()
            return refused

        def on_dequeue(pool, ticket, **kw):  # type: ignore[no-untyped-def]
            dequeue(pool, ticket, **kw)
            self.changed.set()

        def on_start(ref, replica, *, internal, now):  # type: ignore[no-untyped-def]
            started = start(ref, replica, internal=internal, now=now)
            if not internal:
                self.admitted.append(ref)
            self.changed.set()
            return started

        store_pong = self.hub.store_pong

        def on_store_pong(pool, body):  # type: ignore[no-untyped-def]
            store_pong(pool, body)
            self.changed.set()

        self.hub.store_pong = on_store_pong  # type: ignore[method-assign]
        self.hub.enqueue = on_enqueue  # type: ignore[method-assign]
        self.hub.dequeue = on_dequeue  # type: ignore[method-assign]
        self.hub.ledger.start = on_start  # type: ignore[method-assign]

    async def until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def max_overlap(records: list[CallRecord]) -> int:
    edges = sorted([(r.started, 1) for r in records] + [(r.ended, -1) for r in records])
    level = peak = 0
    for _t, step in edges:
        level += step
        peak = max(peak, level)
    return peak


@contextlib.asynccontextmanager
async def pool_of(count: int, *args: str,
                  delay: float = 0.0) -> AsyncIterator[tuple[list[FakeReplica], Gateway]]:
    async with running_replicas(count) as replicas, running_gateway(
            [r.address for r in replicas], *args) as gw:
        for r in replicas:
            r.solve_delay = delay
        yield replicas, gw


async def test_30_builds_on_3_replicas_with_2_slots_queue_fifo_and_all_complete() -> None:
    async with pool_of(3, "--max-builds", "2", delay=0.4) as (replicas, gw):
        watch = QueueWatch(gw)
        port = gateway_port(gw)
        conns = [await connect("grpcio" if i % 2 else "grpc-go", port) for i in range(30)]
        try:
            outs = await asyncio.gather(*(
                buildflow.build(t, context_dir=f"/src/p{i}", node_id=node_id(),
                                rng=random.Random(i), timeout=60)
                for i, t in enumerate(conns)))
        finally:
            for t in conns:
                await t.close()
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
    for r in replicas:
        assert max_overlap(r.calls("/moby.buildkit.v1.Control/Solve")) <= 2, r.name
    assert watch.peak == 24
    assert len(watch.enqueued) == 24
    queued = set(watch.enqueued)
    assert [ref for ref in watch.admitted if ref in queued] == watch.enqueued  # FIFO


async def test_a_cancelled_waiting_build_leaves_the_queue_at_once() -> None:
    async with pool_of(1, "--max-builds", "1", delay=30) as (replicas, gw):
        watch = QueueWatch(gw)
        port = gateway_port(gw)
        busy, waiting = await connect("grpc-go", port), await connect("grpcio", port)
        try:
            first = asyncio.create_task(buildflow.build(busy, context_dir="/a", node_id="1"))
            await watch.until(lambda: len(watch.admitted) == 1)
            second = asyncio.create_task(buildflow.build(waiting, context_dir="/b", node_id="2"))
            await watch.until(lambda: gw.hub is not None and gw.hub.queued() == 1)
            ref = watch.enqueued[0]
            second.cancel()  # Ctrl-C: the client resets the build's calls
            await watch.until(lambda: gw.hub is not None and gw.hub.queued() == 0, timeout=2)
        finally:
            await busy.close()  # ends the running build too (its connection goes away)
            await waiting.close()
        await asyncio.wait({first}, timeout=5)
    assert ref not in replicas[0].refs_seen()  # never opened on the replica


async def test_queue_limits_refuse_with_resource_exhausted_and_clear_text() -> None:
    async with pool_of(1, "--max-builds", "1", "--max-queue", "1", "--queue-timeout", "1s",
                       delay=30) as (_replicas, gw):
        watch = QueueWatch(gw)
        port = gateway_port(gw)
        conns = [await connect("grpc-go", port) for _ in range(3)]
        try:
            running = asyncio.create_task(buildflow.build(conns[0], context_dir="/a",
                                                          node_id="1"))
            await watch.until(lambda: len(watch.admitted) == 1)
            waiting = asyncio.create_task(buildflow.build(conns[1], context_dir="/b",
                                                          node_id="2"))
            await watch.until(lambda: len(watch.enqueued) == 1)
            refused = await buildflow.build(conns[2], context_dir="/c", node_id="3")
            timed_out = await waiting
            running.cancel()
        finally:
            for t in conns:
                await t.close()
    assert refused.error_code == 8
    assert "already waiting for a BuildKit replica of pool default (--max-queue 1)" in (
        refused.error or "")
    assert timed_out.error_code == 8
    assert "became free within 1s (--queue-timeout 1s)" in (timed_out.error or "")


async def test_the_wait_shows_in_the_build_progress_then_the_real_status() -> None:
    async with pool_of(1, "--max-builds", "1", delay=0.3) as (replicas, gw):
        watch = QueueWatch(gw)
        port = gateway_port(gw)
        conns = [await connect("grpc-go", port) for _ in range(4)]
        try:
            tasks = []
            for i, t in enumerate(conns):  # one running, then three queued in order
                tasks.append(asyncio.create_task(buildflow.build(
                    t, context_dir=f"/src/{i}", node_id=node_id(), timeout=30)))
                await watch.until(lambda i=i: len(watch.enqueued) + 1 >= i + 1
                                  and len(watch.admitted) >= 1)
                if i == 0:  # the running build's Ping answer is cached before the others come
                    await watch.until(lambda: watch.hub.pools["default"].pong is not None)
            outs = await asyncio.gather(*tasks)
        finally:
            for t in conns:
                await t.close()
    assert all(o.ok for o in outs), [o.error for o in outs]
    last = outs[3]
    names = [v.name for s in last.status for v in s.vertexes]
    waits = [n for n in names if n.startswith(WAIT + ":")]
    assert waits == [f"{WAIT}: 2 ahead", f"{WAIT}: 1 ahead", f"{WAIT}: 0 ahead"]
    done = [v for s in last.status for v in s.vertexes if v.name == WAIT]
    assert len(done) == 1 and done[0].HasField("completed") and done[0].HasField("started")
    digests = {v.digest for s in last.status for v in s.vertexes if v.name.startswith(WAIT)}
    assert len(digests) == 1
    assert names.index(WAIT) < names.index("[r0] build")  # then the replica's own progress
    # Waiting builds' LLBBridge Pings are answered from the pool's cached Pong (cached from
    # the first build's Ping): only the first build's Ping reached the replica.
    pings = {p.ref for p in replicas[0].calls("/moby.buildkit.v1.frontend.LLBBridge/Ping")}
    assert pings == {outs[0].ref}
