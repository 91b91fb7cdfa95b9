"""Hostile clients: each attack runs beside an innocent build, which must not notice it.

The attacker speaks raw HTTP/2 (this project's frame writer and the `hpack` encoder, so it can
send what no well-behaved client would); the innocent build is the grpc-go-like client
uploading a context to the same replica, so the two share the gateway's replica connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import hpack

from gateway.app import Gateway
from gateway.h2 import frames as fr
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
    async def connect(cls, port: int) -> Attacker:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
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
