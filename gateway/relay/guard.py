"""Limits on what one client may make the gateway do (a shared builder faces every CI job).

Design: `Abuse` is the gateway's: it counts client connections (in all and per client address)
and reports each limit a client hits, counted in `buildkit_gateway_client_limits_total{kind}`
and logged at most once per client address and kind per `LOG_EVERY` seconds, so a flood is one
line, not a million. `ClientGuard` is one connection's, driven by `ClientConn`:

- rates (`RateBudget`, refilled per second, with a burst): stream resets (rapid reset,
  CVE-2023-44487), PINGs, SETTINGS, and streams refused past SETTINGS_MAX_CONCURRENT_STREAMS.
  Past one the connection ends with GOAWAY ENHANCE_YOUR_CALM, as grpc-go and nginx answer;
- time: the client preface within `handshake_timeout`, every header block finished within it
  too (a slowloris holds nothing for long), and a connection with no call at all for
  `idle_timeout` is closed (GOAWAY NO_ERROR first);
- a client that does not read: when its socket buffer passes `WRITE_BUFFER_HIGH` the
  connection stops reading from it and its downloads stop getting credit from the replicas
  (each holds at most its stream window), and if it still has not read after
  `write_timeout` it is dropped.

Invariant: every limit reports once through `Abuse.report` before it acts; all timers are
cancelled in `close`, which the connection calls when it is lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Protocol

from gateway.config import RelaySettings
from gateway.h2 import frames as fr
from gateway.h2.limits import RateBudget
from gateway.metrics import Metrics

log = logging.getLogger("gateway.relay")

LOG_EVERY = 60.0
"""Seconds between two log lines about the same client address and kind of limit."""
LOG_MEMORY = 10_000
"""Client addresses whose last log line is remembered (the oldest are forgotten)."""
WRITE_BUFFER_HIGH = 4 << 20
"""Bytes waiting in a client's socket buffer above which the client counts as not reading."""
WRITE_BUFFER_LOW = 1 << 20
"""... and below which it reads again."""

# (rate per second, burst) per kind; far above what gRPC clients do (grpc-go sends a BDP PING
# per round trip while data flows, a few SETTINGS per connection, resets when builds stop).
RATES: dict[str, tuple[float, float]] = {
    "resets": (100.0, 1000.0),
    "pings": (1000.0, 10_000.0),
    "settings": (10.0, 100.0),
    "refused_streams": (10.0, 100.0),
}
KINDS = (*RATES, "handshake_timeout", "header_timeout", "idle", "write_timeout",
         "connections", "connections_per_client")
"""Every kind of limit, the label values of the metric."""

_FRAME_KIND = {fr.RST_STREAM: "resets", fr.PING: "pings", fr.SETTINGS: "settings"}


class Abuse:
    """The gateway's view of its clients: connection counts, and reports of limits hit."""

    def __init__(self, relay: RelaySettings, metrics: Metrics) -> None:
        self.relay = relay
        self.metrics = metrics
        self.connections = 0
        self.per_client: dict[str, int] = {}
        self._logged: OrderedDict[tuple[str, str], float] = OrderedDict()

    def admit(self, peer: str) -> str | None:
        """Counts a new connection, or returns why it is refused (then nothing is counted)."""
        if self.connections >= self.relay.max_connections:
            return "connections"
        if peer and self.per_client.get(peer, 0) >= self.relay.max_connections_per_client:
            return "connections_per_client"
        self.connections += 1
        if peer:
            self.per_client[peer] = self.per_client.get(peer, 0) + 1
        return None

    def left(self, peer: str) -> None:
        self.connections -= 1
        if peer:
            left = self.per_client[peer] - 1
            if left:
                self.per_client[peer] = left
            else:
                del self.per_client[peer]

    def report(self, peer: str, kind: str, detail: str, *, now: float) -> None:
        self.metrics.client_limits.labels(kind).inc()
        key = (peer, kind)
        last = self._logged.get(key)
        if last is not None and now - last < LOG_EVERY:
            return
        self._logged[key] = now
        self._logged.move_to_end(key)
        while len(self._logged) > LOG_MEMORY:
            self._logged.popitem(last=False)
        log.warning("client limit", extra={"client": peer, "limit": kind, "detail": detail})


class Guarded(Protocol):
    """What the guard needs of its connection."""

    peer: str

    def goaway(self, code: int, message: str, last_sid: int = 0) -> None: ...

    def abort(self) -> None: ...

    def last_stream_id(self) -> int: ...

    def close_idle(self) -> None:
        """GOAWAY NO_ERROR, then close once what is in flight is out."""


class ClientGuard:
    def __init__(self, conn: Guarded, abuse: Abuse, relay: RelaySettings) -> None:
        self.conn = conn
        self.abuse = abuse
        self.relay = relay
        self.loop = asyncio.get_running_loop()
        self.budgets = {kind: RateBudget(rate=rate, burst=burst)
                        for kind, (rate, burst) in RATES.items()}
        self._handshake: asyncio.TimerHandle | None = self.loop.call_later(
            relay.handshake_timeout, self._timed_out, "handshake_timeout",
            "no HTTP/2 preface")
        self._block: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._busy = False  # a call is open (calls_changed)
        self._idle_since = 0.0  # when the last call ended
        self._write: asyncio.TimerHandle | None = None

    def _report(self, kind: str, detail: str) -> None:
        self.abuse.report(self.conn.peer, kind, detail, now=self.loop.time())

    def _calm(self, kind: str, detail: str) -> fr.ProtocolError:
        self._report(kind, detail)
        return fr.ProtocolError(fr.ENHANCE_YOUR_CALM, detail)

    # ---- rates -------------------------------------------------------------------------

    def control_frame(self, ftype: int) -> None:
        """A RST_STREAM, PING or SETTINGS from the client; raises past its budget."""
        kind = _FRAME_KIND[ftype]
        if not self.budgets[kind].spend(self.loop.time()):
            rate, burst = RATES[kind]
            raise self._calm(kind, f"too many {kind.replace('_', ' ')} "
                             f"(more than {burst:g} at once or {rate:g} per second)")

    def refused_stream(self) -> None:
        """A stream refused past the concurrent-stream limit; raises past its budget."""
        if not self.budgets["refused_streams"].spend(self.loop.time()):
            raise self._calm("refused_streams", "streams opened past "
                             "SETTINGS_MAX_CONCURRENT_STREAMS again and again")

    # ---- time --------------------------------------------------------------------------

    def handshake_done(self) -> None:
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None

    def block_started(self) -> None:
        self._block = self.loop.call_later(self.relay.handshake_timeout, self._timed_out,
                                           "header_timeout", "header block not finished")

    def block_finished(self) -> None:
        if self._block is not None:
            self._block.cancel()
            self._block = None

    def calls_changed(self, open_calls: int) -> None:
        """Notes when the last call ended (the idle clock starts) or a call started (it stops).

        The idle timer is not cancelled and re-armed on every change: with one caller making
        call after call that would be two timer operations per call. It stays armed; when it
        fires it checks, and re-arms itself for the time left if the connection was busy."""
        if open_calls:
            self._busy = True
        else:
            self._busy = False
            self._idle_since = self.loop.time()
            if self._idle is None and self.relay.idle_timeout:
                self._idle = self.loop.call_at(self._idle_since + self.relay.idle_timeout,
                                               self._went_idle)

    def _went_idle(self) -> None:
        self._idle = None
        if self._busy:  # re-armed when the last call ends
            return
        due = self._idle_since + self.relay.idle_timeout
        if self.loop.time() < due:  # calls came and went since the timer was armed
            self._idle = self.loop.call_at(due, self._went_idle)
            return
        self._report("idle", f"no call for {self.relay.idle_timeout:g}s")
        self.conn.close_idle()

    def _timed_out(self, kind: str, detail: str) -> None:
        if kind == "handshake_timeout":
            self._handshake = None
        else:
            self._block = None
        seconds = self.relay.handshake_timeout
        self._report(kind, f"{detail} within {seconds:g}s")
        self.conn.goaway(fr.ENHANCE_YOUR_CALM, f"{detail} within {seconds:g}s",
                         self.conn.last_stream_id())

    # ---- a client that does not read ---------------------------------------------------

    def writing_paused(self) -> None:
        if self._write is None:
            self._write = self.loop.call_later(self.relay.write_timeout, self._not_reading)

    def writing_resumed(self) -> None:
        if self._write is not None:
            self._write.cancel()
            self._write = None

    def _not_reading(self) -> None:
        self._write = None
        self._report("write_timeout", f"read nothing for {self.relay.write_timeout:g}s "
                     f"with more than {WRITE_BUFFER_HIGH >> 20} MiB waiting for it")
        self.conn.abort()

    def close(self) -> None:
        for timer in (self._handshake, self._block, self._idle, self._write):
            if timer is not None:
                timer.cancel()
        self._handshake = self._block = self._idle = self._write = None
