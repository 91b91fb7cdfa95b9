"""Global calls: answered from caches (by the relay itself) or by fan-out (control server)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.pb import control_pb2 as cpb
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes.transport import RpcError
from tests.integration.clients import STYLES, client

CONTROL = "/moby.buildkit.v1.Control/"


@pytest.mark.parametrize("style", STYLES)
async def test_disk_usage_and_prune_return_the_union_of_all_replicas(style: str) -> None:
    async with running_replicas(3) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        async with client(style, gateway_port(gw)) as t:
            raw = await t.unary(CONTROL + "DiskUsage", cpb.DiskUsageRequest().SerializeToString())
            usage = cpb.DiskUsageResponse.FromString(raw)
            pruned = [cpb.UsageRecord.FromString(m) async for m in t.server_stream(
                CONTROL + "Prune", cpb.PruneRequest(all=True).SerializeToString())]
    expected = {f"r{i}-{s}" for i in range(3) for s in "ab"}
    assert {r.ID for r in usage.record} == expected
    assert len(usage.record) == 6
    assert {r.ID for r in pruned} == expected
    for r in replicas:
        assert [rec.method for rec in r.records].count(CONTROL + "DiskUsage") == 1
        assert [rec.method for rec in r.records].count(CONTROL + "Prune") == 1


@pytest.mark.parametrize("style", STYLES)
async def test_list_workers_and_info_are_answered_from_cache_with_every_replica_stopped(
        style: str) -> None:
    async with running_replicas(3) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        for r in replicas:
            await r.stop(grace=0)
        port = gateway_port(gw)
        async with client(style, port) as t:
            workers = cpb.ListWorkersResponse.FromString(
                await t.unary(CONTROL + "ListWorkers", b"", timeout=5))
            info = cpb.InfoResponse.FromString(await t.unary(CONTROL + "Info", b"", timeout=5))
            health = await t.unary("/grpc.health.v1.Health/Check", b"", timeout=5)
    assert {w.ID for w in workers.record} == {"r0", "r1", "r2"}
    assert info.buildkitVersion.version == "v0.fake"
    assert health in (b"\x08\x01", b"\x08\x02")  # SERVING until the next probe notices


async def test_list_workers_before_any_replica_answered_is_unavailable() -> None:
    # A replica address with nothing listening: the gateway starts, logs it, and answers
    # global calls with UNAVAILABLE (buildx keeps retrying that while it boots).
    async with running_replicas(1) as replicas:
        dead = replicas[0].address
        await replicas[0].stop(grace=0)
        async with running_gateway([dead]) as gw:
            async with client("grpcio", gateway_port(gw)) as t:
                with pytest.raises(RpcError) as err:
                    await t.unary(CONTROL + "ListWorkers", b"", timeout=5)
    assert err.value.code == 14
    assert "no BuildKit replica has answered" in err.value.details


@pytest.mark.parametrize("style", STYLES)
async def test_the_relay_answers_cached_calls_itself_and_follows_changes(style: str) -> None:
    async with running_replicas(2) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        assert gw.control is not None
        await gw.control.stop()  # whatever still answers is the relay
        async with client(style, gateway_port(gw)) as t:
            workers = cpb.ListWorkersResponse.FromString(
                await t.unary(CONTROL + "ListWorkers", b"", timeout=5))
            info = cpb.InfoResponse.FromString(await t.unary(CONTROL + "Info", b"", timeout=5))
            serving = await t.unary("/grpc.health.v1.Health/Check", b"", timeout=5)
            with pytest.raises(RpcError):  # fan-outs need the control server
                await t.unary(CONTROL + "DiskUsage", b"", timeout=5)

            none_ready = asyncio.Event()
            gw.registry.subscribe(lambda snap: none_ready.set() if not any(
                r.placeable for r in snap.replicas) else None)
            for r in replicas:
                await r.stop(grace=0)
            async with asyncio.timeout(15):
                await none_ready.wait()
            not_serving = await t.unary("/grpc.health.v1.Health/Check", b"", timeout=5)
            still = cpb.ListWorkersResponse.FromString(
                await t.unary(CONTROL + "ListWorkers", b"", timeout=5))
    assert {w.ID for w in workers.record} == {"r0", "r1"}
    assert info.buildkitVersion.version == "v0.fake"
    assert (serving, not_serving) == (b"\x08\x01", b"\x08\x02")
    assert {w.ID for w in still.record} == {"r0", "r1"}  # the last answers, as before
