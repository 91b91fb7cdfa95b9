"""Per-call cost of the relay's unary path in isolation (no sockets).

Replays a recorded grpcio <-> sink exchange of relayed Content/Info calls (64 concurrent callers
on one channel, recorded by a byte-logging proxy: `--record SINKPORT`) through a client and a
replica connection of the real relay wired to transports that only count bytes, in the recorded
order of reads. Prints microseconds of relay CPU per call (Python work, no syscalls).

`--cold MIB` touches every cache line of MIB MiB of memory before each read (not timed), as the
client and the replica do between the gateway's wake-ups when one caller makes one call after
another: the same work then runs with cold CPU caches, which is what one caller's added latency
pays. `--cold 0` (the default) is the hot figure, what many callers per read come close to.

    .venv/bin/python bench/unary_micro.py --record SINKPORT [--calls 5000] [--callers 64]
    .venv/bin/python bench/unary_micro.py [--log FILE] [--repeats 5] [--cold MIB] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pickle
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.h2.frames import HEADERS, PREFACE, FrameReader
from gateway.relay.backend import BackendConn
from gateway.relay.client import ClientConn
from tests.fakes.relay_wiring import RecordingTransport, wired_hub

PATH = "/containerd.services.content.v1.Content/Info"
REQUEST = b"\n\x47sha256:" + b"a" * 64


async def record(port: int, calls: int, out: Path, callers: int = 64) -> None:
    import grpc

    log: list[tuple[str, bytes]] = []

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, d: str) -> None:
            while data := await r.read(65536):
                log.append((d, data))
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pipe(cr, sw, "c"), pipe(sr, cw, "b"))

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    addr = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    async with grpc.aio.insecure_channel(addr, options=[("grpc.enable_http_proxy", 0)]) as ch:
        fn = ch.unary_unary(PATH)
        left = calls

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await fn(REQUEST, timeout=10)

        await asyncio.gather(*(caller() for _ in range(callers)))
    await asyncio.sleep(0.2)
    out.write_bytes(pickle.dumps(log))  # noqa: ASYNC240 (after the timed part)
    print(f"recorded {calls} calls in {len(log)} reads to {out}")


def count_calls(log: list[tuple[str, bytes]]) -> int:
    """The calls in a log: the streams the client's HEADERS frames open."""
    reader = FrameReader()
    streams: set[int] = set()
    preface = True
    for d, data in log:
        if d == "c":
            if preface:  # the log starts with the connection preface
                data, preface = data[len(PREFACE):], False
            streams.update(sid for ftype, _f, sid, _p, _n in reader.feed(data) if ftype == HEADERS)
    return len(streams)


def replay(log: list[tuple[str, bytes]], cold_mib: int = 0) -> tuple[ClientConn, float]:
    hub, upstream = wired_hub()
    backend = BackendConn(upstream)
    backend.connection_made(RecordingTransport(keep=False))
    upstream.connected(backend)
    client = ClientConn(hub, listener="test")
    client.connection_made(RecordingTransport(keep=False))
    c_rx, b_rx = client.data_received, backend.data_received
    if not cold_mib:
        start = time.process_time()
        for d, data in log:
            (c_rx if d == "c" else b_rx)(data)
        return client, time.process_time() - start
    junk = bytearray(cold_mib << 20)
    ones = b"\x01" * (len(junk) // 64)
    clock = time.process_time
    spent = 0.0
    for d, data in log:
        junk[::64] = ones  # one write per 64-byte cache line: evicts the relay's working set
        start = clock()
        (c_rx if d == "c" else b_rx)(data)
        spent += clock() - start
    return client, spent


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", type=int, default=0, help="sink port: record a new log")
    ap.add_argument("--calls", type=int, default=5000, help="calls to record (--record)")
    ap.add_argument("--log", type=Path, default=Path("/tmp/unary_micro.pkl"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--cold", type=int, default=0, metavar="MIB",
                    help="evict CPU caches before each read by touching MIB MiB (0: hot)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.record:
        await record(args.record, args.calls, args.log, args.callers)
        return
    log = pickle.loads(args.log.read_bytes())
    literal = sum(d == "c" and data.count(PATH.encode()) for d, data in log)
    calls = count_calls(log)
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(replay, log, args.cold)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    times = []
    for _ in range(args.repeats):
        client, secs = replay(log, args.cold)
        times.append(secs)
        assert not client.calls, f"{len(client.calls)} calls left open"
    best = min(times)
    print(f"{len(log)} reads; relay CPU per call: best {best / calls * 1e6:.1f} us, "
          f"median {sorted(times)[len(times) // 2] / calls * 1e6:.1f} us "
          f"({calls} calls, caches {f'evicted ({args.cold} MiB)' if args.cold else 'hot'}; "
          f"literal :path seen in {literal} reads)")


if __name__ == "__main__":
    asyncio.run(main())
