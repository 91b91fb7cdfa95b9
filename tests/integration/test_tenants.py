"""Tenants: fair queueing between clients, per-client limits, allow lists.

A client is its certificate's name with mTLS, else its address: here clients connect from
different loopback addresses (127.0.0.1, .2, .3), which the gateway sees as different tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

from gateway.app import Gateway
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.h2_transport import H2Transport
from tests.fakes.ids import node_id
from tests.fakes.replica import BUILD_SECONDS
from tests.integration.test_admission import QueueWatch

A, B, C = "127.0.0.1", "127.0.0.2", "127.0.0.3"


@contextlib.asynccontextmanager
async def client_from(gw: Gateway, source: str) -> AsyncIterator[H2Transport]:
    t = await H2Transport.connect("127.0.0.1", gateway_port(gw), source=source)
    try:
        yield t
    finally:
        await t.close()


async def build_from(gw: Gateway, source: str, i: int, **kw: object) -> buildflow.BuildOutcome:
    async with client_from(gw, source) as t:
        return await buildflow.build(t, context_dir=f"/src/{source}/{i}", node_id=node_id(),
                                     rng=random.Random(i), timeout=60, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def blocker(gw: Gateway, watch: QueueWatch) -> AsyncIterator[None]:
    """A long build of a third client that holds the only slot until the block ends."""
    async with client_from(gw, C) as t:
        task = asyncio.create_task(buildflow.build(
            t, context_dir="/src/blocker", node_id=node_id(), timeout=120,
            frontend_attrs={BUILD_SECONDS: "100"}))
        await watch.until(lambda: len(watch.admitted) == 1)
        try:
            yield
        finally:
            task.cancel()  # the client goes away: its slot is free
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_one_clients_build_is_not_put_behind_another_clients_burst() -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], "--max-builds", "1") as gw:
        watch = QueueWatch(gw)
        async with blocker(gw, watch):
            burst = [asyncio.create_task(build_from(gw, A, i)) for i in range(50)]
            await watch.until(lambda: len(watch.enqueued) == 50, timeout=30)
            single = asyncio.create_task(build_from(gw, B, 0))
            await watch.until(lambda: len(watch.enqueued) == 51)
        outs = await asyncio.gather(*burst)
        alone = await single
    assert all(o.ok for o in outs) and alone.ok, [o.error for o in [*outs, alone] if not o.ok]
    order = [ref for ref in watch.admitted if ref in set(watch.enqueued)]
    a_refs = {o.ref for o in outs}
    before_b = sum(1 for ref in order[:order.index(alone.ref)] if ref in a_refs)
    print(f"\nfairness: B's build placed after {before_b} of A's 50")
    assert before_b <= 5  # placed before at least 45 of A's


async def test_a_client_past_its_queue_share_is_refused_naming_it_and_the_limit() -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], "--max-builds", "1", "--tenant-max-queue", "2") as gw:
        watch = QueueWatch(gw)
        async with blocker(gw, watch):
            waiting = [asyncio.create_task(build_from(gw, A, i)) for i in range(2)]
            await watch.until(lambda: len(watch.enqueued) == 2)
            refused = await build_from(gw, A, 2)
            other = asyncio.create_task(build_from(gw, B, 0))  # another client still queues
            await watch.until(lambda: len(watch.enqueued) == 3)
        outs = await asyncio.gather(*waiting, other)
    assert refused.error_code == 8
    assert f"client {A} already has 2 builds waiting" in (refused.error or "")
    assert "(--tenant-max-queue 2)" in (refused.error or "")
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]


async def test_a_client_at_its_running_limit_waits_while_others_build() -> None:
    async with running_replicas(2) as replicas, running_gateway(
            [r.address for r in replicas], "--tenant-max-builds", "1") as gw:
        watch = QueueWatch(gw)
        first = asyncio.create_task(build_from(gw, A, 0, frontend_attrs={BUILD_SECONDS: "1"}))
        await watch.until(lambda: len(watch.admitted) == 1)
        second = asyncio.create_task(build_from(gw, A, 1))
        await watch.until(lambda: len(watch.enqueued) == 1)  # A's second waits ...
        other = await build_from(gw, B, 0)  # ... while B's goes past it and runs
        assert other.ok, other.error
        assert not second.done()
        outs = [await first, await second]
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
    assert watch.admitted.index(outs[1].ref) > watch.admitted.index(other.ref)


async def test_only_allowed_clients_build_in_a_pool() -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], "--allow", B) as gw:
        denied = await build_from(gw, A, 0)
        allowed = await build_from(gw, B, 0)
    assert denied.error_code == 7
    assert f"client {A} may not build in pool default" in (denied.error or "")
    assert allowed.ok, allowed.error
