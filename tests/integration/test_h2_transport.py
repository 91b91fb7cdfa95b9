"""H2Transport (the grpc-go-like frame-level client) against two servers:

* a plain grpc.aio server (raw-bytes generic handlers), for interop with grpcio's HTTP/2 stack;
* `ScriptedServer`, a hand-written HTTP/2 server in this file, to see the client's frames
  exactly (SETTINGS ordering, HPACK table use, RST_STREAM / GOAWAY / transport-loss handling).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import hpack
import pytest

from tests.fakes.h2_transport import (
    CANCEL,
    CONTINUATION,
    DATA,
    FLAG_ACK,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    GOAWAY,
    GRPC_GO_FRAME_LEN,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    PING,
    PREFACE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    H2Transport,
    encode_frame,
)
from tests.fakes.transport import RpcError

pytestmark = pytest.mark.timeout(20)

SVC = "test.H2"
P = f"/{SVC}/"
MAX_METADATA = 4 << 20
ERROR_BLOB = bytes(range(256)) * 160  # 40 KiB grpc-status-details-bin
ERROR_DETAILS = "it broke: 100% ünïcode, see \"stack\"\nline 2"
BIG = os.urandom(1 << 20)
WAIT = 5.0  # upper bound for event waits (never reached when things work)


# ---------------------------------------------------------------------------- grpc.aio server
@dataclass
class Echo:
    hang_started: asyncio.Event = field(default_factory=asyncio.Event)
    hang_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    at_limit: asyncio.Event = field(default_factory=asyncio.Event)
    limit: int = 0
    active: int = 0
    max_active: int = 0

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def server_stream(self, request: bytes, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[bytes]:
        for i in range(3):
            yield request + bytes([i])

    async def bidi(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[bytes]:
        async for m in requests:
            yield m

    async def sink(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[bytes]:
        digest, total, count = hashlib.sha256(), 0, 0
        async for m in requests:
            digest.update(m)
            total += len(m)
            count += 1
        yield total.to_bytes(8, "big") + count.to_bytes(4, "big") + digest.digest()

    async def error(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, ERROR_DETAILS,
                            trailing_metadata=(("grpc-status-details-bin", ERROR_BLOB),
                                               ("x-extra", "v")))
        raise AssertionError("unreachable")

    async def big(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return BIG

    async def big_stream(self, request: bytes, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[bytes]:
        for _ in range(4):
            yield BIG

    async def metadata(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata(tuple(
            (k, v) for k, v in context.invocation_metadata() if k.startswith("x-")))
        return request

    async def metadata_stream(self, requests: AsyncIterator[bytes],
                              context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        context.set_trailing_metadata(tuple(
            (k, v) for k, v in context.invocation_metadata() if k.startswith("x-")))
        async for m in requests:
            yield m

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hang_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise
        return b""

    async def hang_bidi(self, requests: AsyncIterator[bytes],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            async for m in requests:
                yield m
                self.hang_started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise

    async def gated(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        if self.active >= self.limit:
            self.at_limit.set()
        try:
            await self.gate.wait()
        finally:
            self.active -= 1
        return request


def handlers(echo: Echo) -> grpc.GenericRpcHandler:
    uu, us = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    ss = grpc.stream_stream_rpc_method_handler
    return grpc.method_handlers_generic_handler(SVC, {
        "Unary": uu(echo.unary), "ServerStream": us(echo.server_stream),
        "Bidi": ss(echo.bidi), "Sink": ss(echo.sink), "Error": uu(echo.error),
        "Big": uu(echo.big), "BigStream": us(echo.big_stream),
        "Metadata": uu(echo.metadata), "MetadataStream": ss(echo.metadata_stream),
        "Hang": uu(echo.hang), "HangBidi": ss(echo.hang_bidi), "Gated": uu(echo.gated),
    })


@contextlib.asynccontextmanager
async def grpc_server(*options: tuple[str, object]) -> AsyncIterator[tuple[Echo, int]]:
    echo = Echo()
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.max_metadata_size", MAX_METADATA), ("grpc.absolute_max_metadata_size", MAX_METADATA),
        *options])
    server.add_generic_rpc_handlers([handlers(echo)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield echo, port
    finally:
        await server.stop(None)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Echo, H2Transport]]:
    async with grpc_server() as (echo, port):
        transport = await H2Transport.connect("127.0.0.1", port)
        try:
            yield echo, transport
        finally:
            await transport.close()


# ---------------------------------------------------------------------------- grpc.aio tests
async def test_unary_round_trip_byte_for_byte(served: tuple[Echo, H2Transport]) -> None:
    _, t = served
    for payload in (b"", b"\x00", os.urandom(100), os.urandom(100_000), os.urandom(3 << 20)):
        assert await t.unary(P + "Unary", payload) == payload
    assert t.first_request_after_settings is True
    assert t.max_data_frame_sent <= GRPC_GO_FRAME_LEN
    # grpcio advertises 4 MiB frames; a grpc-go client still never exceeds 16 KiB
    assert t.server_settings.get(SETTINGS_MAX_FRAME_SIZE, 16384) > GRPC_GO_FRAME_LEN
    result = await t.unary_full(P + "Unary", b"abc")
    assert result.response == b"abc"
    assert ("content-type", "application/grpc") not in result.headers  # reserved, like grpc-go


async def test_server_stream_and_bidi(served: tuple[Echo, H2Transport]) -> None:
    _, t = served
    got = [m async for m in t.server_stream(P + "ServerStream", b"req")]
    assert got == [b"req\x00", b"req\x01", b"req\x02"]

    call = await t.bidi(P + "Bidi")
    sent = [os.urandom(n) for n in (0, 1, 5, 16379, 16380, 70_000, 300_000)]
    for m in sent:
        await call.send(m)
        assert await call.recv() == m
    await call.done_writing()
    assert await call.recv() is None
    assert await call.recv() is None  # stays at end
    assert await call.code() == 0


async def test_error_with_40k_details_trailer(served: tuple[Echo, H2Transport]) -> None:
    _, t = served
    with pytest.raises(RpcError) as info:
        await t.unary(P + "Error", b"x")
    err = info.value
    assert err.code == 9  # FAILED_PRECONDITION
    assert err.details == ERROR_DETAILS  # percent-decoded, UTF-8
    trailers = dict(err.trailers)
    assert trailers["grpc-status-details-bin"] == ERROR_BLOB
    assert trailers["x-extra"] == b"v"
    assert "grpc-status" not in trailers and "grpc-message" not in trailers
    assert t.frames_received[CONTINUATION] >= 2  # ~41 KB (Huffman base64) in 16 KB frames
    # the connection is still healthy afterwards
    assert await t.unary(P + "Unary", b"ok") == b"ok"


@pytest.mark.parametrize("dynamic_window", [True, False])
async def test_large_responses_flow_control(dynamic_window: bool) -> None:
    async with grpc_server() as (_, port):
        t = await H2Transport.connect("127.0.0.1", port, dynamic_window=dynamic_window)
        try:
            assert await t.unary(P + "Big", b"") == BIG
            # a reader that takes its time: credit only flows as messages are consumed
            stream = t.open_server_stream(P + "BigStream", b"")
            for _ in range(4):
                assert await stream.recv() == BIG
            assert await stream.recv() is None
            assert t.window_updates_sent > 0
            if dynamic_window:
                assert t.bdp_pings_sent > 0 and t.recv_stream_window > 65535
            else:
                assert t.bdp_pings_sent == 0 and t.recv_stream_window == 65535
        finally:
            await t.close()


async def test_upload_5mb_over_bidi_in_16k_frames(served: tuple[Echo, H2Transport]) -> None:
    _, t = served
    chunks = [os.urandom(256 << 10) for _ in range(20)]  # 5 MiB
    call = await t.bidi(P + "Sink")
    before = t.data_frames_sent
    for c in chunks:
        await call.send(c)
    await call.done_writing()
    reply = await call.recv()
    assert reply is not None and await call.recv() is None
    total = sum(map(len, chunks))
    assert int.from_bytes(reply[:8], "big") == total
    assert int.from_bytes(reply[8:12], "big") == len(chunks)
    assert reply[12:] == hashlib.sha256(b"".join(chunks)).digest()
    assert t.max_data_frame_sent == GRPC_GO_FRAME_LEN
    assert t.data_frames_sent - before >= (total + 5 * len(chunks)) // GRPC_GO_FRAME_LEN + 1


async def test_repeated_metadata_keys_arrive_separately(
        served: tuple[Echo, H2Transport]) -> None:
    _, t = served
    md = [("x-a", "1"), ("x-b", "3"), ("x-a", "2"), ("x-c-bin", b"\x00\xff,\x01"),
          ("X-Upper", "v")]
    result = await t.unary_full(P + "Metadata", b"m", md)
    want = [("x-a", "1"), ("x-b", "3"), ("x-a", "2"), ("x-c-bin", b"\x00\xff,\x01"),
            ("x-upper", "v")]
    assert [kv for kv in result.trailers if kv[0].startswith("x-")] == want

    call = await t.bidi(P + "MetadataStream", md)
    await call.send(b"1")
    assert await call.recv() == b"1"
    await call.done_writing()
    assert await call.recv() is None
    assert [kv for kv in await call.trailers() if kv[0].startswith("x-")] == want


async def test_cancel_reaches_server(served: tuple[Echo, H2Transport]) -> None:
    echo, t = served
    call = await t.bidi(P + "HangBidi")
    await call.send(b"ping")
    assert await call.recv() == b"ping"
    await asyncio.wait_for(echo.hang_started.wait(), WAIT)
    call.cancel()
    await asyncio.wait_for(echo.hang_cancelled.wait(), WAIT)
    with pytest.raises(RpcError) as info:
        await call.recv()
    assert info.value.code == 1
    assert (call.stream_id, CANCEL) in t.rst_sent
    assert await t.unary(P + "Unary", b"still") == b"still"


async def test_unary_timeout_cancels_on_the_wire(served: tuple[Echo, H2Transport]) -> None:
    echo, t = served
    # without grpc-timeout the server has no deadline of its own: only the client's RST ends it
    t.send_grpc_timeout = False
    with pytest.raises(RpcError) as info:
        await t.unary(P + "Hang", b"", timeout=0.3)
    assert info.value.code == 4
    await asyncio.wait_for(echo.hang_cancelled.wait(), WAIT)
    assert any(code == CANCEL for _, code in t.rst_sent)


async def test_task_cancellation_resets_stream(served: tuple[Echo, H2Transport]) -> None:
    echo, t = served
    task = asyncio.create_task(t.unary(P + "Hang", b""))
    await asyncio.wait_for(echo.hang_started.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(echo.hang_cancelled.wait(), WAIT)
    assert t.active_streams() == 0


async def test_many_concurrent_streams_one_connection(
        served: tuple[Echo, H2Transport]) -> None:
    _, t = served
    payloads = [os.urandom(i * 37 % 40_000) for i in range(200)]

    async def bidi_round(i: int) -> None:
        call = await t.bidi(P + "Bidi")
        for j in range(5):
            msg = bytes([i, j]) * 3000
            await call.send(msg)
            assert await call.recv() == msg
        await call.done_writing()
        assert await call.recv() is None

    results = await asyncio.gather(
        *(t.unary(P + "Unary", p) for p in payloads),
        *(bidi_round(i) for i in range(20)),
        *(t.unary(P + "Big", b"") for _ in range(3)))
    assert list(results[:200]) == payloads
    assert all(r == BIG for r in results[220:])
    assert t.requests_sent == 223
    assert t.active_streams() == 0 and not t.closed


async def test_max_concurrent_streams_honoured() -> None:
    async with grpc_server(("grpc.max_concurrent_streams", 4)) as (echo, port):
        echo.limit = 4
        # grpc-core still counts streams it has just completed and answers REFUSED_STREAM to
        # new ones opened within the advertised limit; grpc-go retries those transparently
        t = await H2Transport.connect("127.0.0.1", port, transparent_retry=True)
        try:
            calls = [asyncio.create_task(t.unary(P + "Gated", bytes([i]))) for i in range(20)]
            await asyncio.wait_for(echo.at_limit.wait(), WAIT)
            assert t.server_settings[SETTINGS_MAX_CONCURRENT_STREAMS] == 4
            assert t.active_streams() == 4 and t.requests_sent == 4  # the rest wait for a slot
            echo.gate.set()
            assert await asyncio.gather(*calls) == [bytes([i]) for i in range(20)]
            assert echo.max_active <= 4
        finally:
            await t.close()


async def test_server_shutdown_fails_calls_unavailable() -> None:
    async with grpc_server() as (echo, port):
        t = await H2Transport.connect("127.0.0.1", port)
        assert await t.unary(P + "Unary", b"a") == b"a"
        hanging = asyncio.create_task(t.unary(P + "Hang", b""))
        await asyncio.wait_for(echo.hang_started.wait(), WAIT)
    # server.stop(None) ran: grpcio cancels the handler (-> CANCELLED or RST) and goes away;
    # new calls on this connection fail UNAVAILABLE
    try:
        with pytest.raises(RpcError) as info:
            await asyncio.wait_for(hanging, WAIT)
        assert info.value.code in (1, 14)
        with pytest.raises(RpcError) as info:
            await t.unary(P + "Unary", b"b")
        assert info.value.code == 14
    finally:
        await t.close()


# ---------------------------------------------------------------------------- scripted server
@dataclass
class _Stream:
    path: str = ""
    buf: bytearray = field(default_factory=bytearray)
    headers_sent: bool = False


class ScriptedServer:
    """A hand-written HTTP/2 server that records the client's frames and header blocks.

    Paths: `/t/echo` (unary echo), `/t/bidi` (echo each message), `/t/rst/<code>`
    (RST_STREAM with that code), `/t/drop` (close the TCP connection), `/t/goaway`
    (GOAWAY with last-stream-id 1, stream left unanswered).
    """

    def __init__(self, *, settings: dict[int, int] | None = None,
                 hold_settings: bool = False) -> None:
        self.settings = settings or {}
        self.release = asyncio.Event()
        if not hold_settings:
            self.release.set()
        self.frames: list[tuple[int, int, int]] = []  # (type, flags, stream) from the client
        self.blocks: list[bytes] = []  # request header blocks, raw
        self.dynamic_refs: list[int] = []  # per block: references into the dynamic table
        self.requests: list[list[tuple[str, str]]] = []
        self.ping_acks: list[bytes] = []
        self.changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_until(self, predicate: object, timeout: float = WAIT) -> None:
        assert callable(predicate)
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def _record(self) -> None:
        self.changed.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        decoder = hpack.Decoder()
        refs = [0]
        table = decoder.header_table
        by_index = table.get_by_index

        def counting(index: int) -> tuple[bytes, bytes]:
            if index > len(table.STATIC_TABLE):
                refs[0] += 1
            return by_index(index)

        table.get_by_index = counting  # type: ignore[method-assign]
        encoder = hpack.Encoder()
        streams: dict[int, _Stream] = {}
        held_acks = [0]

        def send(*frames: bytes) -> None:
            writer.writelines(frames)

        def respond_headers(sid: int) -> None:
            send(encode_frame(HEADERS, FLAG_END_HEADERS, sid, encoder.encode(
                [(":status", "200"), ("content-type", "application/grpc")])))

        def respond_trailers(sid: int, status: int = 0) -> None:
            send(encode_frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, sid,
                              encoder.encode([("grpc-status", str(status))])))

        def message(sid: int, body: bytes) -> bytes:
            return encode_frame(DATA, 0, sid, b"\x00" + len(body).to_bytes(4, "big") + body)

        async def send_settings() -> None:
            await self.release.wait()
            payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big")
                               for k, v in self.settings.items())
            send(encode_frame(SETTINGS, 0, 0, payload),  # the server preface comes first
                 *[encode_frame(SETTINGS, FLAG_ACK, 0)] * held_acks[0],
                 encode_frame(PING, 0, 0, b"scripted"))

        settings_task = asyncio.create_task(send_settings())
        try:
            assert await reader.readexactly(len(PREFACE)) == PREFACE
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                ftype, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big")
                payload = await reader.readexactly(length)
                self.frames.append((ftype, flags, sid))
                if ftype == PING and flags & FLAG_ACK:
                    self.ping_acks.append(payload)
                elif ftype == PING:
                    send(encode_frame(PING, FLAG_ACK, 0, payload))
                elif ftype == SETTINGS and not flags & FLAG_ACK:
                    if self.release.is_set():
                        send(encode_frame(SETTINGS, FLAG_ACK, 0))
                    else:
                        held_acks[0] += 1
                elif ftype == HEADERS:
                    assert flags & FLAG_END_HEADERS
                    refs[0] = 0
                    fields = decoder.decode(payload)
                    self.blocks.append(payload)
                    self.dynamic_refs.append(refs[0])
                    self.requests.append(fields)
                    streams[sid] = _Stream(path=dict(fields)[":path"])
                    if streams[sid].path == "/t/goaway":
                        send(encode_frame(GOAWAY, 0, 0, (1).to_bytes(4, "big")
                                          + NO_ERROR.to_bytes(4, "big")))
                elif ftype == DATA and sid in streams:
                    if length:
                        send(encode_frame(WINDOW_UPDATE, 0, 0, length.to_bytes(4, "big")),
                             encode_frame(WINDOW_UPDATE, 0, sid, length.to_bytes(4, "big")))
                    st = streams[sid]
                    st.buf += payload
                    msgs = []
                    while len(st.buf) >= 5 and len(st.buf) >= 5 + int.from_bytes(
                            st.buf[1:5], "big"):
                        n = int.from_bytes(st.buf[1:5], "big")
                        msgs.append(bytes(st.buf[5:5 + n]))
                        del st.buf[:5 + n]
                    if st.path == "/t/bidi":
                        for m in msgs:
                            if not st.headers_sent:
                                respond_headers(sid)
                                st.headers_sent = True
                            send(message(sid, m))
                        if flags & FLAG_END_STREAM:
                            respond_trailers(sid)
                    elif flags & FLAG_END_STREAM:
                        if st.path == "/t/echo":
                            respond_headers(sid)
                            send(message(sid, msgs[0]))
                            respond_trailers(sid)
                        elif st.path.startswith("/t/rst/"):
                            code = int(st.path.rsplit("/", 1)[1])
                            send(encode_frame(RST_STREAM, 0, sid, code.to_bytes(4, "big")))
                        elif st.path == "/t/drop":
                            writer.transport.abort()
                            return
                self._record()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            settings_task.cancel()
            writer.close()
            self._record()
            self._tasks.discard(task)


async def test_waits_for_server_settings_and_answers_ping() -> None:
    async with ScriptedServer(hold_settings=True) as srv:
        t = await H2Transport.connect("127.0.0.1", srv.port)  # returns before SETTINGS
        try:
            call = asyncio.create_task(t.unary("/t/echo", b"first"))
            await srv.wait_until(lambda: (SETTINGS, 0, 0) in srv.frames)
            # bounded check that no HEADERS leave the client while SETTINGS are withheld
            with pytest.raises(TimeoutError):
                await srv.wait_until(lambda: any(f[0] == HEADERS for f in srv.frames), 0.3)
            srv.release.set()
            assert await asyncio.wait_for(call, WAIT) == b"first"
            assert t.first_request_after_settings is True
            await srv.wait_until(lambda: srv.ping_acks == [b"scripted"])
            assert t.pings_answered == 1
            kinds = [f[0] for f in srv.frames]
            assert kinds.index(HEADERS) > kinds.index(SETTINGS)
            headers = srv.requests[0]
            assert headers[:7] == [
                (":method", "POST"), (":scheme", "http"), (":path", "/t/echo"),
                (":authority", f"127.0.0.1:{srv.port}"),
                ("content-type", "application/grpc"),
                ("user-agent", t.user_agent), ("te", "trailers")]
            assert t.user_agent.startswith("grpc-go/1.")
            assert await t.unary("/t/echo", b"t", [("x-k", "v")], timeout=2.5) == b"t"
            assert srv.requests[1][7:] == [("grpc-timeout", "2500000u"), ("x-k", "v")]
        finally:
            await t.close()


def _is_size_update(block: bytes) -> bool:
    return bool(block) and block[0] & 0xE0 == 0x20


@pytest.mark.parametrize("ack_early", [False, True])
async def test_hpack_table_used_before_table_size_applied(ack_early: bool) -> None:
    async with ScriptedServer(settings={SETTINGS_HEADER_TABLE_SIZE: 0}) as srv:
        t = await H2Transport.connect("127.0.0.1", srv.port, authority="gw.example:443",
                                      ack_settings_early=ack_early,
                                      lazy_table_size_max_delay=60.0)
        try:
            for i in range(5):
                assert await t.unary("/t/echo", bytes([i]), [("x-k", "v")]) == bytes([i])
            await srv.wait_until(lambda: len(srv.blocks) == 5)
        finally:
            await t.close()
    assert t.lazy_table_size_requests == 3
    assert srv.requests[0][3] == (":authority", "gw.example:443")
    # first requests: incremental indexing with the 4096-byte table, later blocks reuse it
    assert srv.dynamic_refs[0] == 0 and not _is_size_update(srv.blocks[0])
    assert srv.dynamic_refs[1] > 0 and srv.dynamic_refs[2] > 0
    assert not any(_is_size_update(b) for b in srv.blocks[:3])
    # request 4 starts with the dynamic-table-size update to 0; no table use after that
    assert srv.blocks[3][:1] == b"\x20"
    assert srv.dynamic_refs[3] == 0 and srv.dynamic_refs[4] == 0
    assert t.table_size_update_request == 4
    assert len(srv.blocks[3]) > len(srv.blocks[2])
    order = [f for f in srv.frames if f[0] in (HEADERS, SETTINGS)]
    ack = order.index((SETTINGS, FLAG_ACK, 0))
    headers_before_ack = sum(1 for f in order[:ack] if f[0] == HEADERS)
    assert headers_before_ack == (0 if ack_early else 3)


async def test_table_size_applied_at_once_when_not_lazy() -> None:
    async with ScriptedServer(settings={SETTINGS_HEADER_TABLE_SIZE: 0}) as srv:
        t = await H2Transport.connect("127.0.0.1", srv.port, lazy_table_size_ack=False)
        try:
            for i in range(3):
                assert await t.unary("/t/echo", bytes([i])) == bytes([i])
        finally:
            await t.close()
    assert srv.blocks[0][:1] == b"\x20"
    assert srv.dynamic_refs == [0, 0, 0]
    assert t.table_size_update_request == 1


async def test_lazy_table_size_applied_after_delay_without_requests() -> None:
    async with ScriptedServer(settings={SETTINGS_HEADER_TABLE_SIZE: 0}) as srv:
        t = await H2Transport.connect("127.0.0.1", srv.port, lazy_table_size_max_delay=0.05)
        try:
            assert await t.unary("/t/echo", b"1") == b"1"
            await srv.wait_until(lambda: (SETTINGS, FLAG_ACK, 0) in srv.frames)
            assert await t.unary("/t/echo", b"2") == b"2"
        finally:
            await t.close()
    assert not _is_size_update(srv.blocks[0])
    assert srv.blocks[1][:1] == b"\x20" and srv.dynamic_refs[1] == 0


@pytest.mark.parametrize(("rst_code", "grpc_code"), [
    (CANCEL, 1), (REFUSED_STREAM, 14), (INTERNAL_ERROR, 13), (NO_ERROR, 13)])
async def test_rst_stream_mapping(rst_code: int, grpc_code: int) -> None:
    async with ScriptedServer() as srv:
        t = await H2Transport.connect("127.0.0.1", srv.port)
        try:
            with pytest.raises(RpcError) as info:
                await t.unary(f"/t/rst/{rst_code}", b"")
            assert info.value.code == grpc_code
            assert t.rst_received == [(1, rst_code)]
            assert await t.unary("/t/echo", b"after") == b"after"
        finally:
            await t.close()


async def test_transport_loss_fails_open_calls_unavailable() -> None:
    async with ScriptedServer() as srv:
        t = await H2Transport.connect("127.0.0.1", srv.port)
        try:
            bidi = await t.bidi("/t/bidi")
            await bidi.send(b"hi")
            assert await bidi.recv() == b"hi"
            with pytest.raises(RpcError) as info:
                await t.unary("/t/drop", b"")
            assert info.value.code == 14
            with pytest.raises(RpcError) as info:
                await bidi.recv()
            assert info.value.code == 14
            with pytest.raises(RpcError) as info:
                await t.unary("/t/echo", b"")
            assert info.value.code == 14
            assert t.closed
        finally:
            await t.close()


async def test_goaway_fails_new_calls_and_lets_old_streams_finish() -> None:
    async with ScriptedServer() as srv:
        t = await H2Transport.connect("127.0.0.1", srv.port)
        try:
            bidi = await t.bidi("/t/bidi")  # stream 1
            await bidi.send(b"before")
            assert await bidi.recv() == b"before"
            with pytest.raises(RpcError) as info:
                await t.unary("/t/goaway", b"")  # stream 3 > last-stream-id 1
            assert info.value.code == 14
            assert t.goaway == (1, NO_ERROR, b"")
            with pytest.raises(RpcError) as info:
                await t.unary("/t/echo", b"")
            assert info.value.code == 14
            await bidi.send(b"after")
            assert await bidi.recv() == b"after"
            await bidi.done_writing()
            assert await bidi.recv() is None
            await srv.wait_until(lambda: t.closed)  # closes once stream 1 is done
        finally:
            await t.close()
