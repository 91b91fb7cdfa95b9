"""The client hop: one accepted HTTP/2 connection from buildctl, buildx or any gRPC client.

Design: each new stream is classified by its :path (buildkit/wire.py). Calls of a build are
handed to the connection's `ConnectionPlacement`; Solve and Status first wait for their first
request message (the Ref lives there). Control-class calls go to the in-process control
server, everything else to the replica placement chooses. Until routed, a stream's DATA is held
and its credit withheld. Decisions are carried out at once: `Placed` records the build in the
ledger, `Route` opens the stream on the replica's upstream, `Fail` ends it with a gRPC error.
One timer per connection wakes placement at its earliest deadline.

Garbage on the port (no HTTP/2 preface) is logged and the connection closed; a protocol error
ends the connection with GOAWAY; neither affects other connections.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.buildkit import wire
from gateway.h2 import frames as fr
from gateway.h2.headers import Headers, encode, get, get_all
from gateway.relay.call import Call
from gateway.relay.conn import H2Conn, flush_dirty
from gateway.routing.placement import ConnectionPlacement, Decision, Fail, Placed, Route

if TYPE_CHECKING:
    from gateway.relay.hub import Hub

log = logging.getLogger("gateway.relay")


class ClientConn(H2Conn):
    role = "client"

    def __init__(self, hub: Hub, *, listener: str) -> None:
        super().__init__(hub.relay, name="client")
        self.hub = hub
        self.listener = listener
        self.calls: dict[int, Call] = {}
        self.last_sid = 0
        self.placement: ConnectionPlacement | None = None
        self.peer = ""
        self._preface_needed = len(fr.PREFACE)
        self._preface_buf = b""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.accepting = True

    # ---- connection ------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = str(peer[0])
            self.name = f"client {peer[0]}:{peer[1]}"
        else:
            self.peer = ""
            self.name = f"client {self.listener}"
        self.hub.client_opened(self)
        self.send_preface()
        flush_dirty()

    def local_settings(self) -> list[tuple[int, int]]:
        return [
            *super().local_settings(),
            (fr.SETTINGS_MAX_CONCURRENT_STREAMS, self.relay.max_client_streams),
            (fr.SETTINGS_ENABLE_PUSH, 0),
        ]

    def process(self, data: bytes | memoryview) -> None:
        if self._preface_needed:
            got = self._preface_buf + bytes(data[: self._preface_needed])
            if not fr.PREFACE.startswith(got):
                log.warning("not an HTTP/2 client: closing",
                            extra={"conn": self.name, "first_bytes": bytes(data[:16]).hex()})
                self.closed = True
                if self.transport is not None:
                    self.transport.close()
                return
            rest = data[self._preface_needed :]
            self._preface_needed -= len(got) - len(self._preface_buf)
            self._preface_buf = got if self._preface_needed else b""
            if self._preface_needed or not rest:
                return
            data = rest
        super().process(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for call in list(self.calls.values()):
            call.c_in_done = call.c_out_done = True
            self._abort_backend(call, fr.CANCEL, result="cancelled")
        self.calls.clear()
        self.hub.client_closed(self)
        flush_dirty()

    def last_stream_id(self) -> int:
        return self.last_sid

    def drain(self) -> None:
        """Graceful stop: refuse new streams, let the open ones finish."""
        self.accepting = False
        self.send(fr.goaway(self.last_sid, fr.NO_ERROR, b"gateway shutting down"))
        flush_dirty()
        if not self.calls:
            self.close()

    # ---- streams from the client -----------------------------------------------------------

    def on_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        call = self.calls.get(sid)
        if call is not None:  # client trailers: rare in gRPC; forwarded behind the data
            self._client_data(call, b"", 0, end_stream)
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            raise fr.ProtocolError(fr.PROTOCOL_ERROR, f"invalid new stream id {sid}")
        self.last_sid = sid
        if not self.accepting:
            self.send(fr.rst_stream(sid, fr.REFUSED_STREAM))
            return
        if len(self.calls) >= self.relay.max_client_streams:
            self.send(fr.rst_stream(sid, fr.REFUSED_STREAM))
            return
        path = (get(headers, b":path") or b"").decode("utf-8", "replace")
        authority = (get(headers, b":authority") or b"").decode("utf-8", "replace")
        klass = wire.classify(path)
        call = Call(self, sid, headers, path, authority, klass)
        self.calls[sid] = call
        self.sched.open(sid)
        self.hub.stream_opened(call)
        if self.placement is None:
            self.placement = self.hub.new_placement(authority=authority, client=self.peer)
        if end_stream:
            self._client_data(call, b"", 0, True)
        if klass is wire.CallClass.CONTROL:
            self._route(call, self.hub.control_id)
        elif klass is wire.CallClass.SESSION:
            sid_value = (get(headers, wire.SESSION_UUID) or b"").decode("utf-8", "replace")
            sharedkey = (get(headers, wire.SESSION_SHAREDKEY) or b"").decode("utf-8", "replace")
            if sid_value:
                self._apply(self.placement.session(sid, sid_value, sharedkey, self.hub.now(),
                                                   self.hub.pick))
            else:
                self._apply(self.placement.other(sid, self.hub.pick))
        elif klass is wire.CallClass.LLB:
            ids = get_all(headers, wire.BUILD_ID)
            if len(ids) == 1 and ids[0]:
                ref = ids[0].decode("utf-8", "replace")
                self._apply(self.placement.follower(sid, ref, self.hub.now(), self.hub.owner))
            else:  # the replica answers "no buildid found in context"
                self._apply(self.placement.other(sid, self.hub.pick))
        elif klass is wire.CallClass.OTHER:
            self._apply(self.placement.other(sid, self.hub.pick))
        else:  # SOLVE, STATUS: wait for the first request message
            self._try_first_message(call)

    def on_data(self, sid: int, payload: memoryview, flow_len: int, end: int) -> None:
        call = self.calls.get(sid)
        if call is None or call.c_in_done:
            self.credit(0, flow_len)
            return
        backend = call.backend
        if backend is None or end:
            self._client_data(call, payload, flow_len, bool(end))
            return
        # Hot path: DATA of a routed stream, not its last frame.
        n = backend.sched.data(call.bsid, payload, False, backend.out)
        if not backend.dirty:
            backend.mark()
        if n < 0:
            self.credit(0, flow_len)
        elif n or flow_len != len(payload):
            self.credit(sid, flow_len - len(payload) + n)

    def _client_data(self, call: Call, payload: Any, flow_len: int, end: bool) -> None:
        if end:
            call.c_in_done = True
        backend = call.backend
        if backend is not None:
            n = backend.sched.data(call.bsid, payload, end, backend.out)
            backend.mark()
            if n < 0:
                self.credit(0, flow_len)
            else:
                self.credit(call.csid, flow_len - len(payload) + n)
            if end:
                self._release(call)
            return
        if call.held is None:  # routed to nowhere (failed): drop
            self.credit(0, flow_len)
            return
        call.held.append((payload, end, flow_len))
        call.held_bytes += flow_len
        if call.waiting and call.klass in (wire.CallClass.SOLVE, wire.CallClass.STATUS):
            self._try_first_message(call)

    def _try_first_message(self, call: Call) -> None:
        if not call.waiting or call.held is None:
            return
        try:
            message = wire.first_message(call.held_message())
            if message is None:
                if call.c_in_done:
                    raise wire.DecodeError("request ended before its first message")
                return
            if call.klass is wire.CallClass.SOLVE:
                info = wire.decode_solve(message)
            else:
                ref = wire.decode_ref(message)
        except wire.DecodeError as exc:
            self.end_with_error(call, errors.BadRequest(f"cannot route {call.path}: {exc}"))
            return
        assert self.placement is not None
        if call.klass is wire.CallClass.SOLVE:
            self._apply(self.placement.solve(call.csid, info, self.hub.now(), self.hub.pick))
        elif ref:
            self._apply(self.placement.follower(call.csid, ref, self.hub.now(), self.hub.owner))
        else:
            self._apply(self.placement.other(call.csid, self.hub.pick))

    def on_rst(self, sid: int, code: int) -> None:
        call = self.calls.pop(sid, None)
        self.forget_credit(sid)
        if call is None:
            return
        call.c_in_done = call.c_out_done = True
        dropped = self.sched.close(sid)
        if dropped and call.backend is not None:
            call.backend.credit(0, dropped)
        if call.waiting and self.placement is not None:
            self.placement.forget(sid)
            self._reschedule()
        self._drop_held(call)
        self._abort_backend(call, code if code != fr.NO_ERROR else fr.CANCEL, result="cancelled")

    def on_sent(self, sid: int, n: int) -> None:
        call = self.calls.get(sid)
        if call is not None and call.backend is not None:
            call.backend.credit(call.bsid, n)

    def on_end(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        call.c_out_done = True
        if call.rst_after_end and not call.c_in_done:
            self.out.append(fr.rst_stream(sid, fr.NO_ERROR))
            call.c_in_done = True
            self._drop_held(call)
        self._release(call)

    # ---- carrying out decisions ------------------------------------------------------------

    def _apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            call = self.calls.get(d.stream)
            if isinstance(d, Placed):
                self.hub.build_placed(d, call)
            elif call is None:
                continue
            elif isinstance(d, Route):
                self._route(call, d.replica)
            elif isinstance(d, Fail):
                self.end_with_error(call, errors.NoReplica(d.message))
        self._reschedule()

    def _route(self, call: Call, replica: str) -> None:
        call.waiting = False
        call.replica = replica
        self.hub.open_upstream(call, replica)

    def _reschedule(self) -> None:
        if self.placement is None or self.closed:
            return
        when = self.placement.deadline()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.placement is not None and not self.closed:
            self._apply(self.placement.expire(self.hub.now(), self.hub.pick, self.hub.owner))
        flush_dirty()

    # ---- ending calls ----------------------------------------------------------------------

    def end_with_error(self, call: Call, err: errors.GatewayError) -> None:
        """Ends the client stream with a gRPC error (and the backend stream, if any)."""
        self._abort_backend(call, fr.CANCEL, result=errors.CODE_NAMES[err.code])
        if call.waiting and self.placement is not None:
            self.placement.forget(call.csid)
        call.waiting = False
        self._drop_held(call)
        if not call.c_out_done and not self.closed:
            dropped = self.sched.close(call.csid)
            if dropped and call.backend is not None:
                call.backend.credit(0, dropped)
            block = encode(errors.trailers(err.code, err.message,
                                           headers_sent=call.resp_headers_sent))
            self.out.append(self.send_headers(call.csid, block, end_stream=True))
            call.c_out_done = True
            if not call.c_in_done:
                self.out.append(fr.rst_stream(call.csid, fr.NO_ERROR))
                call.c_in_done = True
            self.mark()
        self.hub.call_failed(call, err)
        self._release(call)

    def _drop_held(self, call: Call) -> None:
        if call.held:
            self.credit(0, call.held_bytes)
        call.held = None
        call.held_bytes = 0

    def _abort_backend(self, call: Call, code: int, *, result: str) -> None:
        backend = call.backend
        if call.build is not None:
            self.hub.build_finished(call, result)
        if backend is None:
            self.hub.cancel_pending(call)
            return
        if not call.b_out_done:
            dropped = backend.sched.close(call.bsid)
            if dropped and not self.closed:
                self.credit(0, dropped)
            backend.send(fr.rst_stream(call.bsid, code))
        call.b_out_done = call.b_in_done = True
        backend.release(call)

    def _release(self, call: Call) -> None:
        if call.c_in_done and call.c_out_done and self.calls.get(call.csid) is call:
            del self.calls[call.csid]
            self.forget_credit(call.csid)
            self.sched.close(call.csid)
            self.hub.stream_closed(call)
            if not self.accepting and not self.calls:
                self.close()
