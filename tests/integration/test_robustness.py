"""Bad input and broken parts get a clear error and lose nothing else."""

from __future__ import annotations

import asyncio
import random

from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.h2_transport import H2Transport
from tests.fakes.ids import node_id
from tests.fakes.replica import FakeReplica
from tests.fakes.transport import RpcError
from tests.integration.clients import client, connect

SOLVE = "/moby.buildkit.v1.Control/Solve"


async def test_garbage_on_the_port_is_dropped_and_builds_still_work() -> None:
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        port = gateway_port(gw)
        for garbage in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01",
                        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(garbage)
            await writer.drain()
            async with asyncio.timeout(5):
                while await reader.read(65536):  # server SETTINGS, maybe a GOAWAY, then EOF
                    pass
            writer.close()
        async with client("grpcio", port) as t:
            out = await buildflow.buildctl(t, context_dir="/src")
        assert out.ok, out.error


async def test_undecodable_solve_gets_invalid_argument_naming_the_problem() -> None:
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        async with client("grpc-go", gateway_port(gw)) as t:
            try:
                await t.unary(SOLVE, b"\x0a\xff\xff\xff\x0f", timeout=5)
            except RpcError as err:
                error = err
            else:
                raise AssertionError("an undecodable Solve was accepted")
            out = await buildflow.build(t, context_dir="/src", node_id=node_id())
    assert error.code == 3
    assert "cannot route /moby.buildkit.v1.Control/Solve" in error.details
    assert out.ok, out.error  # the connection is still good


async def test_unreachable_replica_is_skipped_not_fatal() -> None:
    async with running_replicas(2) as replicas:
        dead = replicas[1].address
        await replicas[1].stop(grace=0)
        async with running_gateway([replicas[0].address, dead]) as gw:
            snap = gw.registry.snapshot
            assert not snap.by_id[dead].ready
            assert snap.by_id[dead].reason  # why, for the status page and the log
            port = gateway_port(gw)
            for i in range(10):
                async with client("grpcio", port) as t:
                    out = await buildflow.buildx_session(t, context_dir=f"/src/{i}",
                                                         node_id=node_id())
                assert out.ok, out.error
                assert out.builds[0].replica == "r0"


async def test_client_resets_mid_flight_leave_other_streams_correct() -> None:
    rng = random.Random(3)
    async with running_replicas(2) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        port = gateway_port(gw)
        async with client("grpc-go", port) as t:
            # Uploads in flight on one connection; half of them are cancelled mid-way.
            async def doomed() -> None:
                call = await t.bidi("/test.Echo/Bidi")
                for _ in range(20):
                    await call.send(b"x" * 30_000)
                call.cancel()

            results = await asyncio.gather(
                *(doomed() for _ in range(5)),
                *(buildflow.build(t, context_dir="/src/app", node_id=node_id(),
                                  upload=2_000_000, rng=random.Random(rng.random()))
                  for _ in range(5)),
                return_exceptions=True)
        for r in results[5:]:
            assert isinstance(r, buildflow.BuildOutcome)
            assert r.ok, r.error
            assert r.exporter_response["uploaded"] == str(2_000_000)
        for r in results[:5]:
            assert not isinstance(r, BaseException) or isinstance(r, RpcError)
        # The gateway still serves the next connection.
        async with client("grpcio", port) as t:
            out = await buildflow.buildctl(t, context_dir="/src")
        assert out.ok, out.error


async def test_routing_stays_correct_when_the_replica_window_stays_at_64_kib() -> None:
    # With BDP probing off, grpcio keeps its 64 KiB initial stream window: most upload frames
    # then wait for window in the gateway, per stream.
    replicas = [FakeReplica(f"w{i}", server_options=[("grpc.http2.bdp_probe", 0)])
                for i in range(2)]
    for r in replicas:
        await r.start()
    try:
        async with running_gateway([r.address for r in replicas]) as gw:
            port = gateway_port(gw)
            conns = [await connect(style, port) for style in ("grpcio", "grpc-go")]
            try:
                outs = await asyncio.gather(*(
                    buildflow.build(t, context_dir=f"/src/{i}", node_id=node_id(),
                                    upload=3_000_000, rng=random.Random(i))
                    for i in range(4) for t in conns))
            finally:
                for t in conns:
                    await t.close()
            windows = {c.sched.initial_window for name, u in gw.hub.upstreams.items()
                       if name != "control" for c in u.conns}
    finally:
        for r in replicas:
            await r.stop(grace=0)
    assert windows and max(windows) <= 65535
    for out in outs:
        assert out.ok, out.error
        assert out.exporter_response["uploaded"] == "3000000"


async def test_unix_socket_listener_serves_builds(tmp_path) -> None:
    path = tmp_path / "gw.sock"
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas], "--listen", f"unix://{path}") as gw:
        assert str(gw.listening[-1]) == f"unix://{path}"
        t = await H2Transport.connect("localhost", 0, unix_path=str(path))
        try:
            out = await buildflow.buildx_session(t, context_dir="/src/app", node_id=node_id())
        finally:
            await t.close()
    assert out.ok, out.error
