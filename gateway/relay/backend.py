"""The replica hop: HTTP/2 connections from the gateway to one replica (or the control server).

Design: an `Upstream` per replica owns its connections and opens each routed call as a new
stream on a connection with room under the replica's MAX_CONCURRENT_STREAMS, dialing another
connection when none has room. Calls routed while a dial is under way wait in order and are
opened when it completes, or ended with UNAVAILABLE naming the replica when it fails. The
protocol object is created in the dial's factory and links itself to the upstream on
`connection_made`, so bytes that arrive before the dial returns are never lost.

Responses are relayed as they come, through the client's send scheduler: response headers,
DATA (credit returned to the replica only once written to the client) and trailers, each
behind what the stream already has queued. A lost connection ends each of its calls with
UNAVAILABLE naming the replica; a GOAWAY refuses (REFUSED_STREAM, which gRPC clients retry) the
streams it did not process and sends new calls to another connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.config import Endpoint, RelaySettings
from gateway.h2 import frames as fr
from gateway.h2.headers import Headers, get
from gateway.metrics import DOWNSTREAM
from gateway.relay.call import Call
from gateway.relay.conn import H2Conn, flush_dirty

if TYPE_CHECKING:
    from gateway.relay.hub import Hub

log = logging.getLogger("gateway.relay")

CONNECT_TIMEOUT = 5.0


class BackendConn(H2Conn):
    role = "replica"
    # A replica connection is shared by many clients' builds: its connection credit goes back
    # as DATA arrives, so streams stalled by slow (or hostile) clients, each holding at most
    # its own --replica-stream-window, never starve the others of connection credit.
    credit_on_receipt = True

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(upstream.relay, name=f"replica {upstream.replica_id}",
                         connection_window=fr.MAX_WINDOW,
                         stream_window=upstream.relay.replica_stream_window)
        self.rx_bytes, self.rx_index = upstream.hub.metrics.relayed, DOWNSTREAM
        self.errors = upstream.hub.metrics.http2_errors
        self.upstream = upstream
        self.calls: dict[int, Call] = {}
        self.next_sid = 1
        self.usable = True  # false after GOAWAY or loss

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.out.append(fr.PREFACE)
        self.send_preface()
        self.upstream.connected(self)
        flush_dirty()

    def local_settings(self) -> list[tuple[int, int]]:
        return [*super().local_settings(), (fr.SETTINGS_ENABLE_PUSH, 0)]

    def has_stream(self, sid: int) -> bool:
        return sid in self.calls

    def has_room(self) -> bool:
        return (self.usable and not self.closed and len(self.calls) < self.peer_max_streams
                and self.next_sid < 2**31 - 1)

    def open_stream(self, call: Call) -> None:
        sid = self.next_sid
        self.next_sid += 2
        self.calls[sid] = call
        self.sched.open(sid)
        call.backend = self
        call.bsid = sid
        self.out.append(self.header_frames(sid, call.headers, False))  # queued as encoded
        held, call.held = call.held or [], None
        call.held_bytes = 0
        client = call.client
        for payload, end, flow_len in held:
            n = self.sched.data(sid, payload, end, self.out)
            client.credit(call.csid, flow_len - len(payload) + max(n, 0))
        self.mark()
        client.mark()

    def release(self, call: Call) -> None:
        if call.b_in_done and call.b_out_done and self.calls.get(call.bsid) is call:
            del self.calls[call.bsid]
            self.forget_credit(call.bsid)
            dropped = self.sched.close(call.bsid)
            if dropped and not call.client.closed:
                call.client.credit(0, dropped)  # queued upload bytes never sent: return them
            if not self.usable and not self.calls:  # after the replica's GOAWAY: done
                self.close()
            self.upstream.room_freed()

    # ---- frames from the replica -----------------------------------------------------------

    def on_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        call = self.calls.get(sid)
        if call is None or call.b_in_done:
            return
        client = call.client
        if end_stream:
            call.b_in_done = True
            status = get(headers, b"grpc-status")
            call.status = int(status) if status and status.isdigit() else errors.UNKNOWN
            if call.build is not None:
                client.hub.build_finished(call, errors.result_name(call.status))
            if call.capture is not None and call.status == 0:
                client.hub.store_pong(client.pool, b"".join(call.capture))
            call.capture = None
        if not call.c_out_done:
            if call.drop_resp_headers:
                # The client already has response headers (the gateway's own, sent while
                # the build waited): drop the replica's, and keep only real trailers.
                if not end_stream:
                    self.release(call)
                    return
                headers = [(n, v) for n, v in headers
                           if not n.startswith(b":") and n != b"content-type"]
            client.sched.headers(call.csid, headers, client.out, end_stream=end_stream)
            call.resp_headers_sent = True
            client.mark()
        self.release(call)

    def on_data(self, sid: int, payload: memoryview, flow_len: int, end: int) -> None:
        call = self.calls.get(sid)
        if call is None or call.b_in_done or call.c_out_done:
            self.credit(0, flow_len)
            if call is not None and end:
                call.b_in_done = True
                self.release(call)
            return
        if call.capture is not None:
            call.capture.append(bytes(payload))
        self.forward(sid, payload, flow_len, bool(end), call.client, call.csid)
        if end:
            call.b_in_done = True
            self.release(call)

    def on_data_run(self, sid: int, payloads: list[memoryview]) -> None:
        call = self.calls.get(sid)
        if call is None or call.b_in_done or call.c_out_done or call.capture is not None:
            super().on_data_run(sid, payloads)
            return
        self.forward_run(sid, payloads, call.client, call.csid)

    def on_rst(self, sid: int, code: int) -> None:
        """The replica reset a stream.

        After its trailers, RST(NO_ERROR) only tells the client to stop sending: it follows the
        trailers. REFUSED_STREAM (never processed) is passed on: gRPC clients retry it. Any
        other reset means the replica is stopping or failing: the client gets UNAVAILABLE
        naming the replica, not a bare reset it cannot explain.
        """
        call = self.calls.get(sid)
        if call is None:
            return
        ended_cleanly = call.b_in_done
        call.b_in_done = call.b_out_done = True
        self.release(call)
        client = call.client
        if client.closed or (call.c_out_done and call.c_in_done):
            return
        if ended_cleanly and code == fr.NO_ERROR:
            if call.c_in_done:
                return
            if call.c_out_done:
                client.send(fr.rst_stream(call.csid, fr.NO_ERROR))
                call.c_in_done = True
                client.release_call(call)
            else:
                call.rst_after_end = True
            return
        if code == fr.REFUSED_STREAM and not call.resp_headers_sent:
            client.refuse(call)
            return
        client.end_with_error(call, errors.ReplicaReset(
            f"BuildKit replica {self.upstream.replica_id} reset the call "
            f"({fr.ERROR_NAMES.get(code, hex(code))})"))

    def on_sent(self, sid: int, n: int) -> None:
        call = self.calls.get(sid)
        if call is not None:
            client = call.client
            client.credit(call.csid if client.calls.get(call.csid) is call else 0, n)

    def on_end(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is not None:
            call.b_out_done = True
            self.release(call)

    def on_settings(self) -> None:
        self.upstream.room_freed()

    def on_goaway(self, last_sid: int, code: int, debug: bytes) -> None:
        self.usable = False
        log.info("replica sent GOAWAY", extra={"replica": self.upstream.replica_id,
                                               "code": fr.ERROR_NAMES.get(code, str(code)),
                                               "debug": debug[:200].decode("utf-8", "replace")})
        for sid, call in list(self.calls.items()):
            if sid > last_sid:  # never processed by the replica: the client may retry
                call.b_in_done = call.b_out_done = True
                self.release(call)
                if not call.c_out_done:
                    call.client.refuse(call)
        self.upstream.room_freed()
        if not self.calls:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()
        self.usable = False
        self.upstream.lost(self, exc)
        reason = f"connection to BuildKit replica {self.upstream.replica_id} lost"
        if exc is not None:
            reason += f": {exc}"
        for call in list(self.calls.values()):
            completed = call.b_in_done  # trailers already in: the call ends normally
            call.b_in_done = call.b_out_done = True
            if completed:
                self.release(call)
            else:
                call.client.end_with_error(call, errors.ReplicaLost(reason))
        self.calls.clear()
        flush_dirty()
        self.sched.detach()  # no cycle left: freed by reference counting alone


class Upstream:
    """All connections from the gateway to one replica."""

    def __init__(self, hub: Hub, replica_id: str, endpoint: Endpoint,
                 relay: RelaySettings) -> None:
        self.hub = hub
        self.replica_id = replica_id
        self.endpoint = endpoint
        self.relay = relay
        self.conns: list[BackendConn] = []
        self.pending: deque[Call] = deque()
        self.dialing = False
        self.closing = False

    def open(self, call: Call) -> None:
        for conn in self.conns:
            if conn.has_room():
                conn.open_stream(call)
                return
        self.pending.append(call)
        if not self.dialing and not self.closing:
            self.dialing = True
            self.hub.spawn(self._dial(), name=f"dial {self.replica_id}")

    def cancel(self, call: Call) -> None:
        try:
            self.pending.remove(call)
        except ValueError:
            pass

    async def _dial(self) -> None:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        try:
            if ep.scheme == "unix":
                await asyncio.wait_for(
                    loop.create_unix_connection(lambda: BackendConn(self), ep.path),
                    CONNECT_TIMEOUT)
            else:
                tls = self.hub.replica_tls
                name = self.hub.servername or ep.host if tls is not None else None
                await asyncio.wait_for(
                    loop.create_connection(lambda: BackendConn(self), ep.host, ep.port,
                                           ssl=tls, server_hostname=name),
                    CONNECT_TIMEOUT)
        except Exception as exc:
            self.dialing = False
            reason = str(exc) or type(exc).__name__
            log.warning("replica unreachable", extra={"replica": self.replica_id,
                                                      "address": str(ep), "error": reason})
            self.hub.replica_unreachable(self.replica_id, reason)
            pending, self.pending = self.pending, deque()
            for call in pending:
                call.client.end_with_error(call, errors.ReplicaUnreachable(
                    f"BuildKit replica {self.replica_id} ({ep}) is unreachable: {reason}"))
            flush_dirty()

    def connected(self, conn: BackendConn) -> None:
        self.dialing = False
        self.conns.append(conn)
        self.room_freed()

    def room_freed(self) -> None:
        while self.pending:
            conn = next((c for c in self.conns if c.has_room()), None)
            if conn is None:
                if not self.dialing and not self.closing:
                    self.dialing = True
                    self.hub.spawn(self._dial(), name=f"dial {self.replica_id}")
                return
            conn.open_stream(self.pending.popleft())

    def lost(self, conn: BackendConn, exc: Exception | None) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        if exc is not None and conn.calls:
            self.hub.replica_unreachable(self.replica_id, f"connection lost: {exc}")
        if self.pending:
            self.room_freed()

    def close(self) -> None:
        self.closing = True
        for conn in list(self.conns):
            conn.goaway(fr.NO_ERROR, "gateway shutting down")
