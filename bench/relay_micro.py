"""Per-frame cost of the relay's DATA path in isolation (no sockets, no peers).

A client connection and a replica connection of the real relay are wired to transports that
only count bytes; a routed Session stream then receives 256 KiB reads of 16 KiB DATA frames,
as buildctl sends them. The replica's windows are refilled after each read, so every frame takes
the path a flowing upload takes. Prints microseconds per DATA frame, with the cost of merely
parsing the same frames (FrameReader alone) measured in the same run as the baseline.

    .venv/bin/python bench/relay_micro.py [--reads 4000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import config
from gateway.builds.ledger import Ledger
from gateway.h2 import frames as fr
from gateway.h2.headers import encode
from gateway.metrics import Metrics
from gateway.relay.backend import BackendConn, Upstream
from gateway.relay.client import ClientConn
from gateway.relay.hub import Hub
from gateway.replicas.registry import Registry, Replica


class CountingTransport:
    def __init__(self) -> None:
        self.bytes = 0

    def writelines(self, data: list[bytes]) -> None:
        for d in data:
            self.bytes += len(d)

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else None

    def close(self) -> None:
        pass


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=4000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    settings = config.load(["--replica", "tcp://127.0.0.1:9"], {})
    registry = Registry([Replica("r", "tcp://127.0.0.1:9", ready=True, reason="")])
    hub = Hub(relay=settings.relay, routing=settings.routing, pools=settings.pools,
              registry=registry, ledger=Ledger(),
              control=config.Endpoint("unix", path="/nonexistent"),
              spawn=lambda coro, name: coro.close(),
              metrics=Metrics(CollectorRegistry(), version="bench"),
              eject=lambda replica, reason: None)
    upstream = Upstream(hub, "r", config.parse_endpoint("tcp://127.0.0.1:9"), settings.relay)
    hub.upstreams["r"] = upstream
    backend = BackendConn(upstream)
    backend.connection_made(CountingTransport())
    backend.data_received(fr.settings([(fr.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 30)])
                          + fr.window_update(0, 1 << 30))
    client = ClientConn(hub, listener="bench")
    client_tx = CountingTransport()
    client.connection_made(client_tx)
    client.data_received(fr.PREFACE + fr.settings([]))
    # A Solve and its Session on stream 1 and 3; the Session then carries the upload.
    solve = b"\x0a\x03ref\x2a\x03sid"
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"gw"),
               (b"content-type", b"application/grpc")]
    client.data_received(
        fr.header_block(1, encode([*headers, (b":path", b"/moby.buildkit.v1.Control/Solve")]),
                        end_stream=False, max_frame=16384)
        + fr.frame(fr.DATA, fr.FLAG_END_STREAM, 1, b"\x00" + len(solve).to_bytes(4, "big")
                   + solve)
        + fr.header_block(3, encode([*headers, (b":path", b"/moby.buildkit.v1.Control/Session"),
                                     (b"x-docker-expose-session-uuid", b"sid"),
                                     (b"x-docker-expose-session-sharedkey", b"")]),
                          end_stream=False, max_frame=16384))
    upstream.connected(backend)
    assert client.calls[3].backend is backend, "session not routed"
    payload = os.urandom(16384)
    chunk = b"".join(fr.frame_header(16384, fr.DATA, 0, 3) + payload for _ in range(16))
    frames = 16 * args.reads
    bsid = client.calls[3].bsid

    def relay() -> None:
        for _ in range(args.reads):
            client.data_received(chunk)
            backend.data_received(fr.window_update(0, 1 << 18) + fr.window_update(bsid, 1 << 18))

    def parse_only() -> None:
        reader = fr.FrameReader()
        for _ in range(args.reads):
            reader.feed(chunk)

    for name, fn in (("parse only (baseline)", parse_only), ("relay DATA path", relay)):
        start = time.perf_counter()
        if args.profile and fn is relay:
            prof = cProfile.Profile()
            prof.runcall(fn)
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        else:
            fn()
        elapsed = time.perf_counter() - start
        print(f"{name:24s} {elapsed / frames * 1e6:6.2f} us per DATA frame")


if __name__ == "__main__":
    asyncio.run(main())
