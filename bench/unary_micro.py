"""Per-call cost of the relay's unary path in isolation (no sockets).

Replays a recorded grpcio <-> sink exchange of relayed Content/Info calls (64 concurrent callers
on one channel, recorded by a byte-logging proxy: `--record SINKPORT`) through a client and a
replica connection of the real relay wired to transports that only count bytes, in the recorded
order of reads. Prints microseconds of relay CPU per call (Python work, no syscalls).

    .venv/bin/python bench/unary_micro.py --record SINKPORT [--calls 5000] [--callers 64]
    .venv/bin/python bench/unary_micro.py [--log FILE] [--repeats 5] [--profile]
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


def replay(log: list[tuple[str, bytes]]) -> tuple[ClientConn, float]:
    hub, upstream = wired_hub()
    backend = BackendConn(upstream)
    backend.connection_made(RecordingTransport(keep=False))
    upstream.connected(backend)
    client = ClientConn(hub, listener="test")
    client.connection_made(RecordingTransport(keep=False))
    c_rx, b_rx = client.data_received, backend.data_received
    start = time.process_time()
    for d, data in log:
        (c_rx if d == "c" else b_rx)(data)
    return client, time.process_time() - start


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", type=int, default=0, help="sink port: record a new log")
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--log", type=Path, default=Path("/tmp/unary_micro.pkl"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.record:
        await record(args.record, args.calls, args.log, args.callers)
        return
    log = pickle.loads(args.log.read_bytes())
    calls = sum(d == "c" and data.count(PATH.encode()) for d, data in log)
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(replay, log)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    times = []
    for _ in range(args.repeats):
        client, secs = replay(log)
        times.append(secs)
        assert not client.calls, f"{len(client.calls)} calls left open"
    best = min(times)
    print(f"{len(log)} reads; relay CPU per call: best {best / args.calls * 1e6:.1f} us, "
          f"median {sorted(times)[len(times) // 2] / args.calls * 1e6:.1f} us "
          f"({args.calls} calls; literal :path seen in {calls} reads)")


if __name__ == "__main__":
    asyncio.run(main())
