"""Graceful stop: running builds finish, queued and new ones are refused clearly."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import node_id
from tests.fakes.transport import RpcError
from tests.integration.clients import client, connect
from tests.integration.test_admission import QueueWatch


async def test_stop_lets_running_builds_finish_and_refuses_queued_and_new_ones() -> None:
    async with running_replicas(2) as replicas, running_gateway(
            [r.address for r in replicas], "--max-builds", "3") as gw:
        hold = asyncio.Event()  # the running builds end only once the stop has been seen
        for r in replicas:
            r.hold = hold
        watch = QueueWatch(gw)
        port = gateway_port(gw)
        conns = [await connect("grpc-go" if i % 2 else "grpcio", port) for i in range(7)]
        try:
            builds = [asyncio.create_task(buildflow.build(
                t, context_dir=f"/src/{i}", node_id=node_id(), rng=random.Random(i)))
                for i, t in enumerate(conns)]
            await watch.until(lambda: len(watch.admitted) == 6 and len(watch.enqueued) == 1)
            gw.stop.set()  # what SIGTERM does
            assert gw.hub is not None
            await watch.until(lambda: gw.hub.queued() == 0)  # type: ignore[union-attr]
            hold.set()
            outs = await asyncio.gather(*builds)
            with pytest.raises(RpcError) as refused:
                await connect("grpc-go", port)
        finally:
            for t in conns:
                await t.close()
    assert refused.value.code == 14 and "Connect call failed" in refused.value.details
    queued = watch.enqueued[0]
    for out in outs:
        if out.ref == queued:  # its Solve is refused (its other calls may fail first)
            assert not out.ok and out.error_code == 14
            assert "shutting down" in out.calls["solve"], out.calls
        else:
            assert out.ok, out.error


async def test_stop_refuses_builds_still_undecided_behind_a_queued_one() -> None:
    # A bake on a connection not bound yet: its first target is queued and the second waits
    # behind it in the connection's placement. Stopping must refuse both, not queue the second.
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas], "--max-builds", "1") as gw:
        replicas[0].solve_delay = 1.0
        watch = QueueWatch(gw)
        port = gateway_port(gw)
        async with client("grpcio", port) as busy, client("grpc-go", port) as baking:
            running = asyncio.create_task(buildflow.build(busy, context_dir="/a", node_id="1"))
            await watch.until(lambda: len(watch.admitted) == 1)
            bake = asyncio.create_task(buildflow.bake(baking, context_dir="/b", node_id="2",
                                                      targets=2))
            await watch.until(lambda: len(watch.enqueued) == 1)
            gw.stop.set()
            first, baked = await asyncio.gather(running, bake)
            assert gw.hub is not None and gw.hub.queued() == 0
    assert first.ok, first.error
    # Refused by the stopping gateway, or (a target not sent before the connection's GOAWAY)
    # by its closed listener: UNAVAILABLE either way, and nothing started after the stop.
    assert [b.error_code for b in baked.builds] == [14, 14], baked.builds
    assert len(watch.admitted) == 1


async def test_a_build_cancelled_while_stopping_lets_the_gateway_stop_at_once() -> None:
    async with running_replicas(1) as replicas:
        replicas[0].solve_delay = 30
        async with running_gateway([r.address for r in replicas],
                                   "--shutdown-grace", "60s") as gw:
            watch = QueueWatch(gw)
            async with client("grpc-go", gateway_port(gw)) as t:
                build = asyncio.create_task(buildflow.build(t, context_dir="/a", node_id="1"))
                await watch.until(lambda: len(watch.admitted) == 1)
                gw.stop.set()
                build.cancel()  # Ctrl-C: the client resets its calls; the connection stays
                assert gw.hub is not None
                async with asyncio.timeout(10):  # not the 60 s grace
                    await gw.hub.no_clients.wait()


async def test_a_solve_of_many_megabytes_is_routed() -> None:
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas]) as gw, client("grpc-go", gateway_port(gw)) as t:
        big = {"build-arg:BLOB": "x" * (12 << 20)}  # a Solve request of 12 MiB
        out = await buildflow.build(t, context_dir="/big", node_id="1", frontend_attrs=big)
    assert out.ok, out.error
