"""Hostile clients: each attack runs beside an innocent build, which must not notice it.

The attacker speaks raw HTTP/2 (this project's frame writer and the `hpack` encoder, so it can
send what no well-behaved client would); the innocent build is the grpc-go-like client
uploading a context to the same replica, so the two share the gateway's replica connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

import hpack

from gateway.app import Gateway
from gateway.h2 import frames as fr
from gateway.relay.client import ClientConn
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import node_id
from tests.fakes.replica import FakeReplica
from tests.integration.clients import connect

SOLVE = b"/moby.buildkit.v1.Control/Solve"
LIST_WORKERS = b"/moby.buildkit.v1.Control/ListWorkers"


@dataclass
class Attacker:
    """A raw HTTP/2 client connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    frames: fr.FrameReader

    @classmethod
    async def connect(cls, port: int, *, source: str = "127.0.0.1") -> Attacker:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        writer.write(fr.PREFACE + fr.settings([]))
        return cls(reader, writer, fr.FrameReader())

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def until_frame(self, ftype: int, *, stream: int | None = None,
                          flags: int = 0, timeout: float = 10.0
                          ) -> tuple[int, int, bytes] | None:
        """(flags, stream, payload) of the first frame of `ftype` (on `stream`, with `flags`
        set); None at EOF."""
        async with asyncio.timeout(timeout):
            while data := await self.reader.read(65536):
                for kind, got, sid, payload, _flow in self.frames.feed(data):
                    if kind == ftype and stream in (None, sid) and got & flags == flags:
                        return got, sid, bytes(payload)
        return None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def request_headers(*extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", SOLVE),
            (b":authority", b"gateway"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers"), *extra]


@contextlib.asynccontextmanager
async def innocent_build(gw: Gateway, *, upload: int = 20 << 20
                         ) -> AsyncIterator[asyncio.Task[buildflow.BuildOutcome]]:
    """A build uploading `upload` bytes, under way while the block runs."""
    t = await connect("grpc-go", gateway_port(gw))
    task = asyncio.create_task(buildflow.build(t, context_dir="/src/innocent",
                                               node_id=node_id(), upload=upload, timeout=60))
    try:
        yield task
        out = await task
        assert out.ok, out.error
    finally:
        task.cancel()
        await t.close()


def ejections(gw: Gateway) -> float:
    return sum(s.value for m in gw.metrics.replica_ejections.collect() for s in m.samples)


async def until_uploading(replica: FakeReplica) -> None:
    await replica.wait_for(lambda: any(st.bytes > 0 for st in replica.sessions.values()), 10)


async def test_an_hpack_bomb_ends_only_the_attackers_connection() -> None:
    """8 KB that decode to 16 MB: refused after 16 times its size, with COMPRESSION_ERROR."""
    async with running_replicas(1) as (replica,), running_gateway([replica.address]) as gw:
        async with innocent_build(gw):
            await until_uploading(replica)
            before = rss()
            attacker = await Attacker.connect(gateway_port(gw))
            encoder = hpack.Encoder()  # indexes the large field once, then refers to it
            bomb = encoder.encode(request_headers(*[(b"x-bomb", b"a" * 4000)] * 4000))
            assert len(bomb) < 16_000
            attacker.send(fr.header_block(1, bomb, end_stream=False, max_frame=16384))
            goaway = await attacker.until_frame(fr.GOAWAY)
            await attacker.close()
            assert goaway is not None
            _last, code, debug = fr.parse_goaway(memoryview(goaway[2]))
            assert code == fr.COMPRESSION_ERROR, debug
            assert b"decodes to more than" in debug
            assert rss() - before < 32 << 20  # it stopped at 16 x 8 KB, not 16 MB
        assert ejections(gw) == 0  # the shared replica connection was never reset
        assert replica.refs_seen()  # the innocent build reached it


async def test_an_honest_oversized_request_is_refused_with_a_clear_status() -> None:
    async with running_replicas(1) as (replica,), running_gateway([replica.address]) as gw:
        attacker = await Attacker.connect(gateway_port(gw))
        big = request_headers((b"x-large", b"v" * 100_000))
        attacker.send(fr.header_block(1, hpack.Encoder().encode(big, huffman=False),
                                      end_stream=False, max_frame=16384))
        found = await attacker.until_frame(fr.HEADERS)
        assert found is not None
        fields = dict(hpack.Decoder().decode(found[2], raw=True))
        assert fields[b"grpc-status"] == b"8"
        assert b"request headers of 100" in fields[b"grpc-message"]
        assert b"(--max-request-header-list)" in fields[b"grpc-message"]
        # the connection goes on: an ordinary call on it is answered
        listing = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", LIST_WORKERS),
                   (b":authority", b"gateway"), (b"content-type", b"application/grpc"),
                   (b"te", b"trailers")]
        attacker.send(fr.header_block(3, hpack.Encoder().encode(listing), end_stream=False,
                                      max_frame=16384)
                      + fr.frame(fr.DATA, fr.FLAG_END_STREAM, 3, b"\0\0\0\0\0"))
        trailers = await attacker.until_frame(fr.HEADERS, stream=3, flags=fr.FLAG_END_STREAM)
        await attacker.close()
        assert trailers is not None
        assert (b"grpc-status", b"0") in hpack.Decoder().decode(trailers[2], raw=True)
        assert not replica.refs_seen()  # the large request never reached the replica


DOWNLOAD = "/test.Echo/Download"


def grpc_message(payload: bytes) -> bytes:
    return b"\0" + len(payload).to_bytes(4, "big") + payload


def queued_toward_clients(gw: Gateway) -> int:
    """Bytes the gateway holds for its clients: waiting for their windows, or in the socket."""
    assert gw.hub is not None
    return sum(conn.sched.total_queued() + (conn.transport.get_write_buffer_size()
                                            if conn.transport is not None else 0)
               for conn in gw.hub.clients)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def download(port: int, size: int) -> tuple[int, float]:
    """(bytes received, seconds) of one server stream through the gateway."""
    t = await connect("grpc-go", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        got = 0
        async for message in t.server_stream(DOWNLOAD, size.to_bytes(8, "big")):
            got += len(message)
        return got, loop.time() - started
    finally:
        await t.close()


async def test_streams_that_never_read_hold_their_window_and_no_one_elses() -> None:
    """130 downloads with a zero window, never read, beside an innocent download from the
    same replica over the same shared replica connection."""
    streams, size, window = 130, 32 << 20, 1 << 20
    async with running_replicas(1) as (replica,), running_gateway([replica.address]) as gw:
        port = gateway_port(gw)
        baseline = (await download(port, size))[1]
        before = rss()
        attacker = await Attacker.connect(port)
        attacker.send(fr.settings([(fr.SETTINGS_INITIAL_WINDOW_SIZE, 0)]))
        encoder = hpack.Encoder()
        for i in range(streams):
            sid = 2 * i + 1
            headers = [(b":method", b"POST"), (b":scheme", b"http"),
                       (b":path", DOWNLOAD.encode()), (b":authority", b"gateway"),
                       (b"content-type", b"application/grpc"), (b"te", b"trailers")]
            attacker.send(fr.header_block(sid, encoder.encode(headers), end_stream=False,
                                          max_frame=16384)
                          + fr.frame(fr.DATA, fr.FLAG_END_STREAM, sid,
                                     grpc_message(size.to_bytes(8, "big"))))
        # every attacking stream fills what the gateway grants it on the replica side
        await replica.wait_for(lambda: replica.inflight()[DOWNLOAD] >= streams, 30)
        got, took = await download(port, size)
        held = queued_toward_clients(gw)
        grown = rss() - before
        await attacker.close()
    assert got == size
    print(f"\nzero-window attack: innocent 32 MiB download {took:.2f}s (alone {baseline:.2f}s), "
          f"gateway holds {held >> 20} MiB for {streams} stalled streams, RSS +{grown >> 20} MiB")
    assert took < 10 * baseline + 1.0
    assert held <= streams * window + (1 << 20)  # a window per stalled stream, no more
    assert grown < 600 << 20  # was 2.3 GB (17 MiB per stream)


HANG = b"/test.Echo/Hang"


def call_headers(path: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
            (b":authority", b"gateway"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers")]


def limits(gw: Gateway, kind: str) -> float:
    return gw.metrics.client_limits.labels(kind)._value.get()


RESET = -1  # the connection was reset before its GOAWAY could be read


async def goaway_code(attacker: Attacker) -> int | None:
    """The code of the GOAWAY the gateway sent; RESET if the connection was reset first (the
    gateway closes at once after its GOAWAY, and unread input makes the kernel reset)."""
    try:
        found = await attacker.until_frame(fr.GOAWAY)
    except (ConnectionResetError, BrokenPipeError):
        return RESET
    return None if found is None else fr.parse_goaway(memoryview(found[2]))[1]


async def list_workers_latency(port: int) -> float:
    t = await connect("grpc-go", port)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        await t.unary(LIST_WORKERS.decode(), b"", timeout=30)
        return loop.time() - started
    finally:
        await t.close()


async def test_rapid_reset_gets_enhance_your_calm_and_the_loop_stays_responsive() -> None:
    async with running_replicas(1) as (replica,), running_gateway([replica.address]) as gw:
        port = gateway_port(gw)
        alone = await list_workers_latency(port)
        async with innocent_build(gw):
            await until_uploading(replica)
            attacker = await Attacker.connect(port)
            block = hpack.Encoder().encode(call_headers(HANG))  # stateless: reusable
            burst = b"".join(
                fr.header_block(sid, block, end_stream=False, max_frame=16384)
                + fr.rst_stream(sid, fr.CANCEL) for sid in range(1, 2 * 20_000, 2))
            before = rss()
            attacker.send(burst)  # 20,000 streams opened and reset at once
            during = await list_workers_latency(port)
            code = await goaway_code(attacker)
            grown = rss() - before
            await attacker.close()
        assert code in (fr.ENHANCE_YOUR_CALM, RESET)
        assert limits(gw, "resets") == 1
        assert grown < 64 << 20
        forwarded = len(replica.calls("Hang"))
    print(f"\nrapid reset: {forwarded} of 20000 reached the replica; ListWorkers "
          f"{during * 1000:.1f} ms during (alone {alone * 1000:.1f} ms)")
    assert forwarded <= 1001  # the burst, then the connection ends
    assert during < 20 * alone + 0.5


async def test_ping_and_settings_floods_end_the_connection() -> None:
    async with running_replicas(1) as (replica,), running_gateway([replica.address]) as gw:
        port = gateway_port(gw)
        for flood, kind in ((fr.ping(b"12345678") * 200_000, "pings"),
                            (fr.settings([(fr.SETTINGS_ENABLE_PUSH, 0)]) * 200, "settings")):
            before = rss()
            attacker = await Attacker.connect(port)
            attacker.send(flood)  # never reading the answers
            assert await goaway_code(attacker) in (fr.ENHANCE_YOUR_CALM, RESET)
            await attacker.close()
            assert limits(gw, kind) == 1
            assert rss() - before < 32 << 20  # was 559 MB of buffered PING ACKs for 5M
        async with client_build(gw) as out:
            assert out.ok, out.error


@contextlib.asynccontextmanager
async def client_build(gw: Gateway) -> AsyncIterator[buildflow.BuildOutcome]:
    t = await connect("grpc-go", gateway_port(gw))
    try:
        yield await buildflow.build(t, context_dir="/src/after", node_id=node_id())
    finally:
        await t.close()


async def test_streams_past_the_limit_again_and_again_get_goaway() -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], "--max-client-streams", "10") as gw:
        attacker = await Attacker.connect(gateway_port(gw))
        block = hpack.Encoder().encode(call_headers(HANG))
        attacker.send(b"".join(fr.header_block(sid, block, end_stream=False, max_frame=16384)
                               for sid in range(1, 2 * 10_000, 2)))
        assert await goaway_code(attacker) in (fr.ENHANCE_YOUR_CALM, RESET)
        await attacker.close()
        assert limits(gw, "refused_streams") == 1


async def test_slow_and_silent_connections_are_closed_after_the_handshake_timeout() -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], "--handshake-timeout", "0.5s",
            "--max-connections-per-client", "1000") as gw:
        port = gateway_port(gw)
        async with innocent_build(gw, upload=1 << 20):
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
            truncated = []
            for _ in range(100):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(fr.PREFACE[:10])  # a truncated preface, then nothing
                truncated.append((reader, writer))
            slow = await Attacker.connect(port)  # a header block that never ends
            block = hpack.Encoder().encode(call_headers(HANG))
            slow.send(fr.frame(fr.HEADERS, 0, 1, block[:10]))
            for reader, _writer in [*silent, *truncated]:
                async with asyncio.timeout(10):
                    while await reader.read(65536):  # the server's SETTINGS, GOAWAY, then EOF
                        pass
            assert await goaway_code(slow) in (fr.ENHANCE_YOUR_CALM, RESET)
            for _reader, writer in [*silent, *truncated]:
                writer.close()
            await slow.close()
        assert limits(gw, "handshake_timeout") == 300
        assert limits(gw, "header_timeout") == 1


async def test_idle_connections_are_closed_with_goaway() -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], "--client-idle-timeout", "0.5s") as gw:
        attacker = await Attacker.connect(gateway_port(gw))
        assert await goaway_code(attacker) == fr.NO_ERROR
        await attacker.close()
        assert limits(gw, "idle") == 1


async def test_connections_per_client_address_are_bounded() -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], "--max-connections-per-client", "20") as gw:
        port = gateway_port(gw)
        held = [await Attacker.connect(port) for _ in range(20)]
        refused = await Attacker.connect(port)
        assert await goaway_code(refused) == fr.ENHANCE_YOUR_CALM
        assert limits(gw, "connections_per_client") == 1
        # another address is another client: it is answered
        other = await Attacker.connect(port, source="127.0.0.2")
        other.send(fr.header_block(1, hpack.Encoder().encode(call_headers(LIST_WORKERS)),
                                   end_stream=False, max_frame=16384)
                   + fr.frame(fr.DATA, fr.FLAG_END_STREAM, 1, grpc_message(b"")))
        trailers = await other.until_frame(fr.HEADERS, stream=1, flags=fr.FLAG_END_STREAM)
        assert trailers is not None
        assert (b"grpc-status", b"0") in hpack.Decoder().decode(trailers[2], raw=True)
        await other.close()
        for a in [*held, refused]:
            await a.close()
        async with client_build(gw) as out:
            assert out.ok, out.error


async def test_a_client_that_does_not_read_is_paused_then_dropped() -> None:
    """Huge windows, a 64 MiB download, and no read: the gateway buffers a bounded amount,
    stops crediting the replica, and drops the client after --client-write-timeout."""
    size = 64 << 20
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], "--client-write-timeout", "1s") as gw:
        assert gw.hub is not None
        async with innocent_build(gw, upload=4 << 20):
            attacker = await Attacker.connect(gateway_port(gw))
            await attacker.until_frame(fr.SETTINGS)  # accepted: its connection exists
            port = attacker.writer.get_extra_info("sockname")[1]
            conn = next(c for c in gw.hub.clients if c.name.endswith(f":{port}"))
            paused, lost = asyncio.Event(), asyncio.Event()
            held: list[int] = []
            pause_writing, connection_lost = conn.pause_writing, conn.connection_lost

            def on_pause() -> None:
                pause_writing()
                held.append(queued_toward_clients(gw))
                paused.set()

            def on_lost(exc: Exception | None) -> None:
                held.append(queued_toward_clients(gw))  # it only grew while paused
                connection_lost(exc)
                lost.set()

            conn.pause_writing = on_pause  # type: ignore[method-assign]
            conn.connection_lost = on_lost  # type: ignore[method-assign]
            attacker.send(fr.settings([(fr.SETTINGS_INITIAL_WINDOW_SIZE, fr.MAX_WINDOW)])
                          + fr.window_update(0, fr.MAX_WINDOW - fr.DEFAULT_WINDOW))
            attacker.send(fr.header_block(1, hpack.Encoder().encode(
                call_headers(DOWNLOAD.encode())), end_stream=False, max_frame=16384)
                + fr.frame(fr.DATA, fr.FLAG_END_STREAM, 1, grpc_message(size.to_bytes(8, "big"))))
            async with asyncio.timeout(20):
                await paused.wait()  # the socket filled up, then the gateway's buffer
                await lost.wait()  # then the write timeout
            await attacker.close()
        assert limits(gw, "write_timeout") == 1
    print(f"\nnon-reading client: at most {max(held) >> 20} MiB held for it")
    assert max(held) < 12 << 20  # the socket buffer's high mark, a stream window, a frame


async def test_closed_connections_are_freed_without_the_cyclic_gc() -> None:
    """Connection churn with the cyclic GC off: every closed client connection is freed by
    reference counting alone, so memory stays flat however rarely the GC runs."""
    async with running_replicas(1) as (replica,), running_gateway([replica.address]) as gw:
        assert gw.hub is not None
        hub = gw.hub
        port = gateway_port(gw)
        conns: list[weakref.ref[ClientConn]] = []
        opened = hub.client_opened

        def client_opened(conn: ClientConn) -> None:
            conns.append(weakref.ref(conn))
            opened(conn)

        hub.client_opened = client_opened  # type: ignore[method-assign]

        async def churn(count: int) -> None:
            for _ in range(count):
                attacker = await Attacker.connect(port)
                attacker.send(fr.header_block(1, hpack.Encoder().encode(
                    call_headers(LIST_WORKERS)), end_stream=False, max_frame=16384)
                    + fr.frame(fr.DATA, fr.FLAG_END_STREAM, 1, grpc_message(b"")))
                await attacker.until_frame(fr.HEADERS, stream=1, flags=fr.FLAG_END_STREAM)
                await attacker.close()
            async with asyncio.timeout(10):
                await hub.no_clients.wait()

        await churn(100)  # warm-up: caches, pools, the allocator's arenas
        gc.collect()
        gc.disable()
        try:
            before, freed_before = rss(), sum(r() is None for r in conns)
            await churn(1000)
            grown = rss() - before
            alive = [r for r in conns if r() is not None]
        finally:
            gc.enable()
    print(f"\nchurn: 1000 connections with the GC off, RSS +{grown >> 10} KiB, "
          f"{len(alive)} of {len(conns)} connection objects alive (warm-up: {freed_before} "
          f"of 100 freed)")
    assert not alive
    assert grown < 8 << 20


async def test_a_header_block_past_twice_the_request_limit_ends_at_once() -> None:
    """A client's header block is cut at twice --max-request-header-list (was 16 MiB held per
    connection, until a timeout that did not exist)."""
    async with running_replicas(1) as (replica,), running_gateway([replica.address]) as gw:
        attacker = await Attacker.connect(gateway_port(gw))
        attacker.send(fr.frame(fr.HEADERS, 0, 1, b"\x00" * 16384)
                      + fr.frame(fr.CONTINUATION, 0, 1, b"\x00" * 16384) * 15)  # 256 KiB
        assert await goaway_code(attacker) in (fr.ENHANCE_YOUR_CALM, RESET)
        await attacker.close()
        errors = gw.metrics.http2_errors.labels("client", "ENHANCE_YOUR_CALM")._value.get()
        assert errors == 1


async def test_a_flood_of_empty_continuation_frames_is_cut_like_a_large_block() -> None:
    async with running_replicas(1) as (replica,), running_gateway([replica.address]) as gw:
        attacker = await Attacker.connect(gateway_port(gw))
        attacker.send(fr.frame(fr.HEADERS, 0, 1, b"")
                      + fr.frame(fr.CONTINUATION, 0, 1, b"") * 20_000)
        assert await goaway_code(attacker) in (fr.ENHANCE_YOUR_CALM, RESET)
        await attacker.close()
        errors = gw.metrics.http2_errors.labels("client", "ENHANCE_YOUR_CALM")._value.get()
        assert errors == 1
