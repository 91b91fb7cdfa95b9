"""History calls reach the replica that ran the build; pools chosen by :authority."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.pb import control_pb2 as cpb
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import new_id, node_id
from tests.fakes.replica import FakeReplica
from tests.fakes.transport import Transport
from tests.integration.clients import client, connect

CONTROL = "/moby.buildkit.v1.Control/"
CONTENT_INFO = "/containerd.services.content.v1.Content/Info"


async def _history(t: Transport, **fields: object) -> list[cpb.BuildHistoryEvent]:
    request = cpb.BuildHistoryRequest(**fields).SerializeToString()  # type: ignore[arg-type]
    return [cpb.BuildHistoryEvent.FromString(m)
            async for m in t.server_stream(CONTROL + "ListenBuildHistory", request)]


async def _builds_on_every_replica(port: int, replicas: list[FakeReplica]) -> dict[str, str]:
    """Builds from fresh connections until every replica ran some; returns Ref -> replica."""
    owners: dict[str, str] = {}
    i = 0
    while {r.name for r in replicas} - set(owners.values()) or len(owners) < 6:
        async with client("grpcio", port) as t:
            out = await buildflow.build(t, context_dir=f"/src/h{i}", node_id=node_id())
        assert out.ok, out.error
        owners[out.ref] = out.replica
        i += 1
        assert i < 60
    return owners


def _calls(replicas: list[FakeReplica], method: str, ref: str) -> set[str]:
    return {r.name for r in replicas for rec in r.calls(method) if rec.ref == ref}


async def test_history_and_content_calls_reach_the_owner_and_listings_merge() -> None:
    async with running_replicas(3) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        port = gateway_port(gw)
        owners = await _builds_on_every_replica(port, replicas)
        for ref, owner in owners.items():
            t = await connect("grpc-go", port)  # a new buildx process: `buildx history ...`
            try:
                events = await _history(t, Ref=ref, EarlyExit=True)
                await t.unary(CONTENT_INFO, b"")
                status = [cpb.StatusResponse.FromString(m) async for m in t.server_stream(
                    CONTROL + "Status", cpb.StatusRequest(Ref=ref).SerializeToString())]
                await t.unary(CONTROL + "UpdateBuildHistory",
                              cpb.UpdateBuildHistoryRequest(Ref=ref).SerializeToString())
            finally:
                await t.close()
            assert [e.record.Ref for e in events] == [ref]
            assert any(v.name == f"[{owner}] build" for s in status for v in s.vertexes)
            for method in ("ListenBuildHistory", "Status", "UpdateBuildHistory"):
                assert _calls(replicas, CONTROL + method, ref) == {owner}, method
        # Content reads followed the history call to its owner: one per lookup above.
        content = {r.name: len(r.calls(CONTENT_INFO)) for r in replicas}
        assert content == {name: list(owners.values()).count(name) for name in content}

        # `buildx history ls`: one listing merged from every replica, one timestamp header.
        async with client("grpc-go", port) as t:
            call = t.open_server_stream(  # type: ignore[attr-defined]
                CONTROL + "ListenBuildHistory",
                cpb.BuildHistoryRequest(EarlyExit=True).SerializeToString())
            refs = [cpb.BuildHistoryEvent.FromString(m).record.Ref async for m in call]
            headers = await call.headers()
        assert sorted(refs) == sorted(owners)
        assert [k for k, _v in headers].count("buildkit-current-timestamp") == 1


async def test_a_gateway_without_memory_finds_owners_by_history_never_by_status() -> None:
    async with running_replicas(3) as replicas:
        async with running_gateway([r.address for r in replicas]) as gw:
            owners = await _builds_on_every_replica(gateway_port(gw), replicas)
        async with running_gateway([r.address for r in replicas],  # an empty ledger
                                   "--hold-timeout", "200ms") as fresh:
            port = gateway_port(fresh)
            for ref, owner in owners.items():
                async with client("grpcio", port) as t:
                    status = [cpb.StatusResponse.FromString(m) async for m in t.server_stream(
                        CONTROL + "Status", cpb.StatusRequest(Ref=ref).SerializeToString())]
                assert any(v.name == f"[{owner}] build" for s in status for v in s.vertexes)
                assert _calls(replicas, CONTROL + "Status", ref) == {owner}
            async with client("grpc-go", port) as t:
                unknown = new_id()
                error = None
                try:
                    async for _m in t.server_stream(
                            CONTROL + "Status", cpb.StatusRequest(Ref=unknown).SerializeToString()):
                        pass
                except Exception as exc:
                    error = exc
            assert getattr(error, "code", None) == 5
            assert f"no such job {unknown}" in str(error)


async def test_two_pools_by_authority_and_a_multi_platform_build_over_both(
        tmp_path: Path) -> None:
    async with running_replicas(3) as replicas:
        amd, arm = replicas[:2], replicas[2:]
        config = tmp_path / "gw.yaml"
        config.write_text(
            "pools:\n"
            "  - name: arm64\n"
            f"    replica: [tcp://{arm[0].address}]\n"
            "    authority: [arm64.builders.test]\n")
        async with running_gateway([r.address for r in amd], "--config", str(config)) as gw:
            port = gateway_port(gw)
            amd_t = await connect("grpc-go", port, authority="amd64.builders.test:1234")
            arm_t = await connect("grpcio", port, authority="arm64.builders.test:1234")
            try:
                workers = {}
                for name, t in (("amd", amd_t), ("arm", arm_t)):
                    raw = await t.unary(CONTROL + "ListWorkers", b"")
                    workers[name] = {w.ID for w in cpb.ListWorkersResponse.FromString(raw).record}
                ref = new_id()  # buildx reuses one Ref on every node of a multi-node builder
                outs = await asyncio.gather(
                    buildflow.build(amd_t, context_dir="/src/app", node_id="aa", ref=ref),
                    buildflow.build(arm_t, context_dir="/src/app", node_id="aa", ref=ref))
            finally:
                await amd_t.close()
                await arm_t.close()
    assert workers == {"amd": {"r0", "r1"}, "arm": {"r2"}}
    assert all(o.ok for o in outs), [o.error for o in outs]
    assert outs[0].replica in {"r0", "r1"} and outs[1].replica == "r2"


async def test_a_ref_already_running_is_never_placed_on_the_same_replica() -> None:
    async with running_replicas(2) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        for r in replicas:
            r.solve_delay = 0.5
        port = gateway_port(gw)
        conns = [await connect("grpc-go", port) for _ in range(2)]
        ref = new_id()
        try:
            outs = await asyncio.gather(*(
                buildflow.build(t, context_dir="/src/same", node_id="bb", ref=ref)
                for t in conns))
        finally:
            for t in conns:
                await t.close()
    assert all(o.ok for o in outs), [o.error for o in outs]
    assert {o.replica for o in outs} == {"r0", "r1"}
