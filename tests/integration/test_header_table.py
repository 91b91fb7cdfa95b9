"""Header blocks index into HPACK dynamic tables kept in step with each peer.

Toward the replica: the replica here is the `h2` library (an independent HTTP/2 and HPACK
implementation), serving gRPC by hand: it advertises a SETTINGS_HEADER_TABLE_SIZE, answers the
gateway's probes, and echoes each request's header list back as the reply, so the client sees
exactly what the replica's decoder made of the gateway's blocks, call after call, while entries
are added and evicted.

Toward the client: an `h2` client with a tiny stream window (so trailers wait behind their
stream's data while other streams' headers go out), several calls at once, and a
SETTINGS_HEADER_TABLE_SIZE that may be lowered mid-connection; its decoder is strict about the
order of blocks and about the size update the first block after a lowering must carry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes, Settings

from gateway.buildkit.wire import frame_message
from gateway.pb import control_pb2 as cpb
from tests.conftest import gateway_port, running_gateway

pytestmark = pytest.mark.timeout(30)

ECHO = "/test.Headers/Echo"


def _reply(path: str, headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The reply message of `path` (None: the call stays open, as subscriptions do)."""
    if path == "/grpc.health.v1.Health/Check":
        return b"\x08\x01"
    if path == "/moby.buildkit.v1.Control/ListWorkers":
        rec = cpb.WorkerRecord(ID="h2-worker",
                               platforms=[cpb.Platform(Architecture="amd64", OS="linux")])
        return cpb.ListWorkersResponse(record=[rec]).SerializeToString()
    if path == "/moby.buildkit.v1.Control/Info":
        version = cpb.BuildkitVersion(package="github.com/moby/buildkit", version="v0.0.0-h2")
        return cpb.InfoResponse(buildkitVersion=version).SerializeToString()
    if path in ("/grpc.health.v1.Health/Watch", "/moby.buildkit.v1.Control/ListenBuildHistory"):
        return None
    return b"\n".join(n + b"=" + v for n, v in headers if not n.startswith(b":"))


class H2Replica(asyncio.Protocol):
    """One connection of the replica, served by `h2`."""

    def __init__(self, table_size: int, served: list[H2Replica]) -> None:
        config = H2Configuration(client_side=False, header_encoding=None)
        self.conn = H2Connection(config=config)
        self.conn.local_settings = self.conn.local_settings.__class__(
            client=False, initial_values={SettingCodes.HEADER_TABLE_SIZE: table_size})
        served.append(self)
        self.echoed = 0  # calls of ECHO answered (the gateway's relay connections)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, list[tuple[bytes, bytes]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.conn.receive_data(data):
            if isinstance(event, RequestReceived):
                self.requests[event.stream_id] = [(bytes(n), bytes(v))
                                                  for n, v in event.headers]
            elif isinstance(event, DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
            elif isinstance(event, StreamEnded):
                self._answer(event.stream_id)
            elif isinstance(event, StreamReset):
                self.requests.pop(event.stream_id, None)
            elif isinstance(event, ConnectionTerminated):
                self.transport.close()
        self.transport.write(self.conn.data_to_send())

    def _answer(self, sid: int) -> None:
        headers = self.requests.pop(sid)
        path = dict(headers)[b":path"].decode()
        body = _reply(path, headers)
        if body is None:
            return
        self.echoed += path == ECHO
        self.conn.send_headers(sid, [(b":status", b"200"),
                                     (b"content-type", b"application/grpc")])
        self.conn.send_data(sid, frame_message(body))
        echoed = [(b"x-echo", v) for n, v in headers if n == b"x-new"]  # varies per call
        self.conn.send_headers(sid, [(b"grpc-status", b"0"), *echoed], end_stream=True)


@contextlib.asynccontextmanager
async def h2_replica(table_size: int) -> AsyncIterator[tuple[str, list[H2Replica]]]:
    served: list[H2Replica] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: H2Replica(table_size, served),
                                      "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", served
    finally:
        server.close()


@pytest.mark.parametrize("table_size", [0, 200, 4096])
async def test_replica_decodes_every_request_block_while_the_table_churns(
        table_size: int) -> None:
    async with h2_replica(table_size) as (address, served), \
            running_gateway([address]) as gw:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port(gw)}") as channel:
            echo = channel.unary_unary(ECHO)
            for i in range(120):
                # Repeating fields (indexed), one new per call (added, evicting old ones
                # from a small table), a deadline (never indexed), a credential.
                metadata = (("x-fixed", "same every call"), ("x-new", f"value {i}"),
                            ("x-cycle", f"c{i % 7}" * (i % 5 + 1)),
                            ("authorization", "Bearer secret"), ("x-fixed", "second"))
                reply = await echo(b"", metadata=metadata, timeout=10, wait_for_ready=True)
                got = [line.split(b"=", 1) for line in reply.split(b"\n")]
                sent = [(k.encode(), v.encode()) for k, v in metadata]
                for key in {k for k, _ in sent}:  # grpcio groups repeated keys
                    assert [p[1] for p in got if p[0] == key] == [v for k, v in sent
                                                                  if k == key]
                assert any(p[0] == b"grpc-timeout" for p in got)
    # The gateway's encoder shrank its table to what the replica allows, and told it so.
    relayed = [c for c in served if c.echoed]
    assert sum(c.echoed for c in relayed) == 120
    tables = [c.conn.decoder.header_table for c in relayed]
    assert all(t.maxsize <= table_size for t in tables)
    if table_size == 4096:
        # Repeated fields went in; the deadline and the credential never did.
        entries = [(bytes(n), bytes(v)) for t in tables for n, v in t.dynamic_entries]
        assert (b"x-fixed", b"same every call") in entries
        assert not any(n in (b"grpc-timeout", b"authorization") for n, _ in entries)


LIST_WORKERS = "/moby.buildkit.v1.Control/ListWorkers"  # answered by the gateway itself


async def _h2_calls(port: int, *, table_size: int, lower_to: int | None, rounds: int,
                    ) -> H2Connection:
    """Rounds of four concurrent calls (three relayed, one answered by the gateway) from an
    `h2` client; checks every response; returns the client's connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
    conn.local_settings = Settings(client=True, initial_values={
        SettingCodes.HEADER_TABLE_SIZE: table_size, SettingCodes.INITIAL_WINDOW_SIZE: 8})
    conn.initiate_connection()
    try:
        for r in range(rounds):
            if lower_to is not None and r == rounds // 2:
                conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: lower_to})
            calls: dict[int, str] = {}
            for j in range(4):
                sid = conn.get_next_available_stream_id()
                path = LIST_WORKERS if j == 3 else ECHO
                calls[sid] = f"{r}-{j}"
                conn.send_headers(sid, [
                    (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()),
                    (b":authority", b"gateway"), (b"content-type", b"application/grpc"),
                    (b"te", b"trailers"), (b"x-new", calls[sid].encode())])
                conn.send_data(sid, frame_message(b""), end_stream=True)
            writer.write(conn.data_to_send())
            got: dict[int, dict[str, list[tuple[bytes, bytes]] | bytes]] = {
                sid: {"body": b""} for sid in calls}
            left = set(calls)
            while left:
                data = await reader.read(65536)
                assert data, "the gateway closed the connection"
                for event in conn.receive_data(data):  # raises on any HPACK disorder
                    if isinstance(event, ResponseReceived):
                        got[event.stream_id]["headers"] = event.headers
                    elif isinstance(event, DataReceived):
                        got[event.stream_id]["body"] += event.data  # type: ignore[operator]
                        conn.acknowledge_received_data(event.flow_controlled_length,
                                                       event.stream_id)
                    elif isinstance(event, TrailersReceived):
                        got[event.stream_id]["trailers"] = event.headers
                    elif isinstance(event, StreamEnded):
                        left.discard(event.stream_id)
                    else:
                        assert not isinstance(event, (StreamReset, ConnectionTerminated)), event
                writer.write(conn.data_to_send())
            for sid, tag in calls.items():
                call = got[sid]
                assert (b":status", b"200") in call["headers"]
                trailers = call["trailers"]
                assert (b"grpc-status", b"0") in trailers
                if tag.endswith("-3"):  # the gateway's cached answer
                    assert b"h2-worker" in call["body"]  # type: ignore[operator]
                else:
                    assert (b"x-echo", tag.encode()) in trailers
                    assert b"x-new=" + tag.encode() in call["body"]  # type: ignore[operator]
    finally:
        writer.close()
    return conn


@pytest.mark.parametrize(("table_size", "lower_to"),
                         [(4096, None), (200, None), (0, None), (4096, 0), (4096, 100)])
async def test_client_decodes_every_response_block_whatever_order_streams_end(
        table_size: int, lower_to: int | None) -> None:
    async with h2_replica(4096) as (address, _served), \
            running_gateway([address]) as gw:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port(gw)}") as channel:
            # the replica is up and ListWorkers is cached before the h2 client's calls
            await channel.unary_unary(LIST_WORKERS)(b"", timeout=10, wait_for_ready=True)
        conn = await _h2_calls(gateway_port(gw), table_size=table_size, lower_to=lower_to,
                               rounds=12)
    table = conn.decoder.header_table
    assert table.maxsize <= min(table_size, 4096 if lower_to is None else lower_to)
    if table_size == 4096 and lower_to is None:
        # The gateway indexed the repeated response fields in the client's table.
        entries = [(bytes(n), bytes(v)) for n, v in table.dynamic_entries]
        assert (b"content-type", b"application/grpc") in entries
