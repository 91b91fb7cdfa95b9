"""Graceful stop: running builds finish, queued and new ones are refused clearly."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import node_id
from tests.fakes.transport import RpcError
from tests.integration.clients import connect
from tests.integration.test_admission import QueueWatch


async def test_stop_lets_running_builds_finish_and_refuses_queued_and_new_ones() -> None:
    async with running_replicas(2) as replicas, running_gateway(
            [r.address for r in replicas], "--max-builds", "3") as gw:
        for r in replicas:
            r.solve_delay = 1.0
        watch = QueueWatch(gw)
        port = gateway_port(gw)
        conns = [await connect("grpc-go" if i % 2 else "grpcio", port) for i in range(7)]
        try:
            builds = [asyncio.create_task(buildflow.build(
                t, context_dir=f"/src/{i}", node_id=node_id(), rng=random.Random(i)))
                for i, t in enumerate(conns)]
            await watch.until(lambda: len(watch.admitted) == 6 and len(watch.enqueued) == 1)
            gw.stop.set()  # what SIGTERM does
            outs = await asyncio.gather(*builds)
            with pytest.raises(RpcError) as refused:
                await connect("grpc-go", port)
        finally:
            for t in conns:
                await t.close()
    assert refused.value.code == 14 and "Connect call failed" in refused.value.details
    queued = watch.enqueued[0]
    for out in outs:
        if out.ref == queued:
            assert not out.ok and out.error_code == 14
            assert "shutting down" in (out.error or "")
        else:
            assert out.ok, out.error
