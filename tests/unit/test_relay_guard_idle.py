"""relay/guard.py: the idle timer stays armed while calls come and go, and still closes a
connection only after --client-idle-timeout without any call."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from prometheus_client import CollectorRegistry

from gateway import config
from gateway.metrics import Metrics
from gateway.relay.guard import Abuse, ClientGuard


class Conn:
    peer = "127.0.0.1"

    def __init__(self) -> None:
        self.idle_at: float | None = None

    def goaway(self, code: int, message: str, last_sid: int = 0) -> None:
        pass

    def abort(self) -> None:
        pass

    def last_stream_id(self) -> int:
        return 0

    def close_idle(self) -> None:
        self.idle_at = asyncio.get_running_loop().time()


def test_idle_clock_starts_at_the_last_call_and_timers_are_not_rearmed_per_call() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        relay = replace(config.load(["--replica", "tcp://127.0.0.1:9"], {}).relay,
                        idle_timeout=0.2)
        conn = Conn()
        guard = ClientGuard(conn, Abuse(relay, Metrics(CollectorRegistry(), version="t")), relay)
        guard.handshake_done()
        start = loop.time()
        guard.calls_changed(0)
        timer = guard._idle
        assert timer is not None
        for _ in range(100):  # call after call: the same timer stays armed
            guard.calls_changed(1)
            guard.calls_changed(0)
        assert guard._idle is timer
        await asyncio.sleep(0.1)
        guard.calls_changed(1)
        await asyncio.sleep(0.05)
        last_ended = loop.time()
        guard.calls_changed(0)
        await asyncio.sleep(0.1)  # the first deadline passed: re-armed for the time left
        assert conn.idle_at is None and guard._idle is not None
        await asyncio.sleep(0.2)
        assert conn.idle_at is not None and conn.idle_at - last_ended >= 0.2 - 0.01
        # busy the whole time: never idle, however long
        conn.idle_at = None
        guard.calls_changed(1)
        await asyncio.sleep(0.3)
        assert conn.idle_at is None
        guard.calls_changed(0)
        await asyncio.sleep(0.3)
        assert conn.idle_at is not None
        guard.close()
        assert loop.time() - start < 2

    asyncio.run(scenario())
