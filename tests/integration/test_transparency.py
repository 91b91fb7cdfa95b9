"""The relay is transparent: bytes, metadata, errors and cancellation pass unchanged."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes.replica import error_details
from tests.fakes.transport import RpcError
from tests.integration.clients import STYLES, client

ECHO = "/test.Echo/"
METADATA = [("x-echo-a", "1"), ("x-echo-b", "two"), ("x-echo-a", "3"),
            ("x-docker-expose-session-grpc-method", "/moby.filesync.v1.FileSync/DiffCopy"),
            ("x-docker-expose-session-grpc-method", "/moby.filesync.v1.Auth/Credentials")]


@pytest.fixture(params=STYLES)
def style(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_unknown_methods_of_all_four_shapes_pass_byte_for_byte(style: str) -> None:
    payload = os.urandom(1 << 20)
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        async with client(style, gateway_port(gw)) as t:
            assert await t.unary(ECHO + "Unary", payload, METADATA) == payload
            streamed = [m async for m in t.server_stream(ECHO + "ServerStream", payload[:5000],
                                                         METADATA)]
            assert streamed == [payload[:5000]] * 3
            call = await t.bidi(ECHO + "ClientStream", METADATA)
            parts = [payload[i : i + 70_000] for i in range(0, 350_000, 70_000)]
            for part in parts:
                await call.send(part)
            await call.done_writing()
            assert await call.recv() == b"".join(parts)
            assert await call.recv() is None
            call = await t.bidi(ECHO + "Bidi", METADATA)
            for part in parts:
                await call.send(part)
                assert await call.recv() == part
            await call.done_writing()
            assert await call.recv() is None
    for rec in replicas[0].records:
        if rec.method.startswith(ECHO):
            # Repeated keys stay separate values in their order (gRPC keeps no order across
            # different keys, and grpcio groups them).
            for key in {k for k, _v in METADATA}:
                got = [v for k, v in rec.metadata if k == key]
                assert got == [v for k, v in METADATA if k == key], (rec.method, key)


async def test_error_trailers_of_tens_of_kb_arrive_intact(style: str) -> None:
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        async with client(style, gateway_port(gw)) as t:
            with pytest.raises(RpcError) as err:
                await t.unary(ECHO + "Error", (60 * 1024).to_bytes(4, "big"), METADATA)
    assert err.value.code == 9
    assert err.value.details == "deliberate failure"
    trailers = dict(err.value.trailers)
    assert trailers["grpc-status-details-bin"] == error_details(60 * 1024)
    assert [v for k, v in err.value.trailers if k == "x-echo-a"] in ([b"1", b"3"], ["1", "3"])


async def test_client_cancel_reaches_the_replica(style: str) -> None:
    # No deadline on the call: only the client's RST_STREAM can end it on the replica.
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        async with client(style, gateway_port(gw)) as t:
            call = asyncio.create_task(t.unary(ECHO + "Hang", b"x"))
            await replicas[0].wait_for(lambda: replicas[0].inflight()[ECHO + "Hang"] == 1, 5)
            call.cancel()
            record = await replicas[0].wait_cancelled(ECHO + "Hang", timeout=5)
    assert record.outcome == "cancelled"
