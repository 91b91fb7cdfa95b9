"""A FakeReplica in a process of its own, for tests that kill a replica like a crash would.

    python -m tests.fakes.replica_main --name r1 [--solve-delay 3]

Prints `READY <host:port>` once listening, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio

from tests.fakes.replica import FakeReplica


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--solve-delay", type=float, default=0.0)
    args = ap.parse_args()
    replica = FakeReplica(args.name, solve_delay=args.solve_delay)
    address = await replica.start()
    print(f"READY {address}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
