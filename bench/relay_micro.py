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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.h2 import frames as fr
from tests.fakes.relay_wiring import SESSION, wired_relay


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reads", type=int, default=4000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    relay = wired_relay(
        replica_frames=fr.settings([(fr.SETTINGS_INITIAL_WINDOW_SIZE, 1 << 30)])
        + fr.window_update(0, 1 << 30),
        client_settings=[], keep=False)
    client, backend, bsid = relay.client, relay.backend, relay.bsid
    payload = os.urandom(16384)
    chunk = b"".join(fr.frame_header(16384, fr.DATA, 0, SESSION) + payload for _ in range(16))
    frames = 16 * args.reads

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
