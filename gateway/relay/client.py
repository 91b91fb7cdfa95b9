"""The client hop: one accepted HTTP/2 connection from buildctl, buildx or any gRPC client.

Design: each new stream is classified by its :path (buildkit/wire.py). Calls of a build are
handed to the connection's `ConnectionPlacement`; Solve and Status first wait for their first
request message (the Ref lives there). Control-class calls go to the in-process control
server, everything else to the replica placement chooses; ListWorkers, Info and health Check
are answered by the connection itself from the pool's cached answers (`Answers`, supplied by
control/answers.py) once the client's request has ended, as pre-framed bytes. Until routed, a
stream's DATA is held and its credit withheld. Decisions are carried out at once: `Placed`
records the build in the ledger, `Route` opens the stream on the replica's upstream, `Fail`
ends it with a gRPC error.
One timer per connection wakes placement at its earliest deadline.

Garbage on the port (no HTTP/2 preface) is logged and the connection closed; a protocol error
ends the connection with GOAWAY; neither affects other connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from gateway import errors
from gateway.admission.progress import WAIT_NAME
from gateway.admission.queue import Waiter
from gateway.buildkit import wire
from gateway.config import RelaySettings
from gateway.h2 import frames as fr
from gateway.h2.headers import HeaderDecoder, Headers, get, get_all
from gateway.metrics import UPSTREAM
from gateway.relay.call import Call
from gateway.relay.conn import H2Conn, flush_dirty
from gateway.relay.guard import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW, ClientGuard
from gateway.relay.tls import identity
from gateway.routing.pick import Outcome
from gateway.routing.placement import (
    ConnectionPlacement,
    Decision,
    Enqueue,
    Fail,
    Placed,
    Route,
    Unlocated,
    Waiting,
)

if TYPE_CHECKING:
    from gateway.relay.hub import Hub

_FIRST_MESSAGE = (wire.CallClass.SOLVE, wire.CallClass.STATUS, wire.CallClass.HISTORY)

log = logging.getLogger("gateway.relay")

HPACK_EXPANSION = 16
"""How many times its own size a client's header block may decode to (see `header_decoder`)."""

POOL_HEADER = b"x-buildkit-gateway-pool"
LINGER = 5.0  # seconds a finished connection waits for the client to close its side
_OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_OK_TRAILERS = [(b"grpc-status", b"0")]


class Answers(Protocol):
    """Control calls the relay answers itself (control/answers.py implements it)."""

    def answer(self, pool: str, path: str) -> bytes | None:
        """The gRPC-framed response message for `path` in `pool`, or None (route the call to
        the control server)."""
        ...


class _NoAnswers:
    def answer(self, pool: str, path: str) -> bytes | None:
        return None


def _rfc3339(ns: int) -> bytes:
    stamp = datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ns % 1_000_000_000:09d}Z".encode()


class ClientConn(H2Conn):
    role = "client"

    def __init__(self, hub: Hub, *, listener: str, answers: Answers | None = None) -> None:
        super().__init__(hub.relay, name="client")
        self.answers: Answers = answers or _NoAnswers()
        self.rx_bytes, self.rx_index = hub.metrics.relayed, UPSTREAM
        self.errors = hub.metrics.http2_errors
        self.hub = hub
        self.listener = listener
        self.calls: dict[int, Call] = {}
        # id(headers) -> (headers, path, authority, class) of request lists seen recently
        self._seen: dict[int, tuple[Headers, str, str, wire.CallClass]] = {}
        self.last_sid = 0
        self.placement: ConnectionPlacement | None = None
        self.pool = hub.default_pool
        self.pick = hub.picker(self.pool, "")
        self._tickets: dict[int, int] = {}  # stream of a queued Solve -> admission ticket
        self.peer = ""  # the client's address
        self.identity = ""  # its verified certificate's name (mTLS)
        self._preface_needed = len(fr.PREFACE)
        self._preface_buf = b""
        self._timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.accepting = True  # new streams are taken (false once GOAWAY went either way)
        self.draining = False  # the gateway is stopping: no new builds
        self.guard: ClientGuard | None = None  # the limits (relay/guard.py), once admitted

    # ---- connection ------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.identity = identity(transport.get_extra_info("ssl_object"))  # mTLS, else ""
        named = f" {self.identity}" if self.identity else ""
        if isinstance(peer, tuple):
            self.peer = str(peer[0])
            self.name = f"client{named} {peer[0]}:{peer[1]}"
        else:
            self.peer = ""
            self.name = f"client{named} {self.listener}"
        refused = self.hub.abuse.admit(self.peer)
        if refused is not None:
            self.hub.abuse.report(self.peer, refused, "too many connections",
                                  now=self.hub.now())
            self.closed = True
            transport.write(fr.settings([]) + fr.goaway(0, fr.ENHANCE_YOUR_CALM,
                                                        b"too many connections"))
            transport.close()
            return
        self.guard = ClientGuard(self, self.hub.abuse, self.relay)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        self.hub.client_opened(self)
        self.send_preface()
        if self.hub.draining:  # accepted just as the gateway began to stop
            self.drain()
        flush_dirty()

    def header_decoder(self, relay: RelaySettings) -> HeaderDecoder:
        """Client blocks: at most 16 times their size decoded (HPACK bombs), at most
        --max-header-list in all; the encoded block itself at most twice the request limit
        (an honest block is hardly larger than its decoded list)."""
        self.max_block = 2 * relay.max_request_header_list
        return HeaderDecoder(max_header_list_size=relay.max_header_list,
                             max_expansion=HPACK_EXPANSION,
                             floor=relay.max_request_header_list)

    def local_settings(self) -> list[tuple[int, int]]:
        return [
            *((k, v) for k, v in super().local_settings()
              if k != fr.SETTINGS_MAX_HEADER_LIST_SIZE),
            (fr.SETTINGS_MAX_HEADER_LIST_SIZE, self.relay.max_request_header_list),
            (fr.SETTINGS_MAX_CONCURRENT_STREAMS, self.relay.max_client_streams),
            (fr.SETTINGS_ENABLE_PUSH, 0),
        ]

    def process(self, data: bytes | memoryview) -> None:
        if self._preface_needed:
            got = self._preface_buf + bytes(data[: self._preface_needed])
            if not fr.PREFACE.startswith(got):
                log.warning("not an HTTP/2 client: closing",
                            extra={"conn": self.name, "first_bytes": bytes(data[:16]).hex()})
                self.errors.labels("client", "not_http2").inc()
                self.closed = True
                if self.transport is not None:
                    self.transport.close()
                return
            rest = data[self._preface_needed :]
            self._preface_needed -= len(got) - len(self._preface_buf)
            self._preface_buf = got if self._preface_needed else b""
            if self._preface_needed:
                return
            if self.guard is not None:
                self.guard.handshake_done()
                self.guard.calls_changed(0)
            if not rest:
                return
            data = rest
        super().process(data)

    def has_stream(self, sid: int) -> bool:
        return sid in self.calls

    @property
    def tenant(self) -> str:
        """Whose builds these are: the certificate's name (mTLS), else the address."""
        return self.identity or self.peer or self.listener

    def on_control(self, ftype: int) -> None:
        if self.guard is not None:
            self.guard.control_frame(ftype)

    def on_block(self, *, started: bool) -> None:
        if self.guard is not None:
            if started:
                self.guard.block_started()
            else:
                self.guard.block_finished()

    def close_idle(self) -> None:
        """No call for --client-idle-timeout: GOAWAY, then close (relay/guard.py)."""
        if self.closed or not self.accepting:
            return
        self.accepting = False
        self.send(fr.goaway(self.last_sid, fr.NO_ERROR, b"idle"))
        if not self.calls:
            self.finish()
        flush_dirty()

    def pause_writing(self) -> None:
        """The client's socket buffer is past WRITE_BUFFER_HIGH: it does not read. Read no
        more from it, and credit no more of its downloads to the replicas, until it does."""
        self.paused = True
        self.pause_input("write")
        if self.guard is not None:
            self.guard.writing_paused()

    def resume_writing(self) -> None:
        self.paused = False
        if self.guard is not None:
            self.guard.writing_resumed()
        self.resume_input("write")
        self.return_deferred_credit()
        flush_dirty()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()
        if self.guard is None:  # refused at once: never counted as a client
            self.sched.detach()
            return
        self.guard.close()
        self.hub.abuse.left(self.peer)
        self.return_deferred_credit()
        for timer in (self._timer, self._linger):
            if timer is not None:
                timer.cancel()
        for ticket in self._tickets.values():
            self.hub.dequeue(self.pool, ticket)
        self._tickets.clear()
        for call in list(self.calls.values()):
            call.c_in_done = call.c_out_done = True
            self._drop_out(call)  # the replica's window must not shrink
            self._abort_backend(call, fr.CANCEL, result="cancelled")
            self.hub.stream_closed(call)
        self.calls.clear()
        self.hub.client_closed(self)
        flush_dirty()
        # No cycles left behind: a closed connection is freed by reference counting alone.
        self.sched.detach()
        self.guard = None

    def last_stream_id(self) -> int:
        return self.last_sid

    def on_goaway(self, last_sid: int, code: int, debug: bytes) -> None:
        """The client is going away: it opens no more streams; close once its calls end."""
        self.accepting = False
        if not self.calls:
            self.finish()

    def drain(self) -> None:
        """Graceful stop: no new builds, builds already running finish.

        Running builds still open streams (LLBBridge calls, Status), so the connection keeps
        accepting them; new Solves and queued builds get UNAVAILABLE. GOAWAY goes out once no
        build of the connection is left, and the connection closes when its calls are done.
        """
        self.draining = True
        self._refuse_waiting()
        self._maybe_goaway()
        flush_dirty()

    def _refuse_waiting(self) -> None:
        """While stopping: every call of a build not placed yet (queued, pending, or held
        waiting for its Solve) gets UNAVAILABLE; calls of running builds are never waiting."""
        for call in list(self.calls.values()):
            if call.waiting and call.klass is not wire.CallClass.CONTROL:
                ticket = self._tickets.pop(call.csid, None)
                if ticket is not None:
                    self.hub.dequeue(self.pool, ticket, outcome="shutdown")
                self.end_with_error(call, errors.ShuttingDown(
                    "the gateway is shutting down; this build had not started yet"))

    def finish(self) -> None:
        """Closes a connection that has no calls left, without losing what is in flight.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the last frames the client has not read yet (an OK trailer, say). So: send our FIN,
        keep reading until the client closes its side, and abort only after LINGER seconds.
        """
        if self.transport is None or self.closed or self._linger is not None:
            return
        self.flush()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        try:
            self.transport.write_eof()
            self.eof_sent = True
        except OSError:  # the client is already gone
            self.abort()
            return
        self._linger = asyncio.get_running_loop().call_later(LINGER, self.abort)

    def _maybe_goaway(self) -> None:
        if not self.draining or not self.accepting:
            return
        if any(c.klass is wire.CallClass.SOLVE for c in self.calls.values()):
            return
        self.accepting = False
        self.send(fr.goaway(self.last_sid, fr.NO_ERROR, b"gateway shutting down"))
        if not self.calls:
            self.finish()

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
            if self.guard is not None:
                self.guard.refused_stream()
            self.send(fr.rst_stream(sid, fr.REFUSED_STREAM))
            return
        seen = self._seen.get(id(headers))
        if seen is not None and seen[0] is headers:  # the decoder's list of a repeated block
            _, path, authority, klass = seen
        else:
            path = (get(headers, b":path") or b"").decode("utf-8", "replace")
            authority = (get(headers, b":authority") or b"").decode("utf-8", "replace")
            klass = wire.classify(path)
            if len(self._seen) >= 64:
                self._seen.clear()
            # keyed by identity: the entry holds the list, so its id is not reused meanwhile
            self._seen[id(headers)] = (headers, path, authority, klass)
        call = Call(self, sid, headers, path, authority, klass)
        self.calls[sid] = call
        self.sched.open(sid)
        self.hub.stream_opened(call)
        if self.guard is not None and len(self.calls) == 1:
            self.guard.calls_changed(1)
        size = self.decoder.size  # list_size(headers), counted while decoding
        if size > self.relay.max_request_header_list:  # never re-encoded toward a replica
            self.end_with_error(call, errors.RequestHeadersTooLarge(
                f"request headers of {size} bytes exceed the gateway's limit of "
                f"{self.relay.max_request_header_list} (--max-request-header-list)"))
            return
        if self.placement is None:
            self.placement = self.hub.new_placement(authority=authority, client=self.peer)
            self.pool = self.hub.pool_for(listener=self.listener, authority=authority)
            self.pick = self.hub.picker(self.pool, self.tenant)
        if not self.hub.allowed(self.pool, self.tenant):
            self.end_with_error(call, errors.NotAllowed(
                f"client {self.tenant} may not build in pool {self.pool} (not in its allow "
                f"list)"))
            return
        if end_stream:
            self._client_data(call, b"", 0, True)
        placement = self.placement
        if klass is wire.CallClass.CONTROL:
            answer = self.answers.answer(self.pool, path)
            if answer is None:
                self._route(call, self.hub.control_id)
            elif call.c_in_done:
                self._answer(call, answer)
            else:  # answered once the request has ended (`_client_data`)
                call.answer = answer
        elif klass is wire.CallClass.SESSION:
            sid_value = (get(headers, wire.SESSION_UUID) or b"").decode("utf-8", "replace")
            sharedkey = (get(headers, wire.SESSION_SHAREDKEY) or b"").decode("utf-8", "replace")
            if sid_value:
                self._apply(placement.session(sid, sid_value, sharedkey, self.hub.now(),
                                              self.pick))
            else:
                self._apply(placement.other(sid, self.pick))
        elif klass is wire.CallClass.LLB:
            ids = get_all(headers, wire.BUILD_ID)
            if len(ids) == 1 and ids[0]:
                ref = ids[0].decode("utf-8", "replace")
                self._apply(placement.follower(sid, ref, self.hub.now(), self.hub.locate))
            else:  # the replica answers "no buildid found in context"
                self._apply(placement.other(sid, self.pick))
        elif klass is wire.CallClass.CONTENT or klass is wire.CallClass.OTHER:
            # placement.other without its decision list: a Route, or NoReplica
            target = placement.other_target() or self.hub.pick_other(self.pool)
            if target is None:
                self._apply(placement.other(sid, self.pick))
            else:
                self._route(call, target)
        else:  # SOLVE, STATUS, HISTORY: wait for the first request message
            self._try_first_message(call)

    def on_data(self, sid: int, payload: memoryview, flow_len: int, end: int) -> None:
        """A frame that ends its stream or is padded, or any frame of a stream not routed yet
        (the flowing bulk of a routed stream comes as runs: `on_data_run`)."""
        call = self.calls.get(sid)
        if call is None or call.c_in_done:
            self.credit(0, flow_len)
            return
        self._client_data(call, payload, flow_len, bool(end))

    def on_data_run(self, sid: int, payloads: list[memoryview]) -> None:
        call = self.calls.get(sid)
        if call is None or call.c_in_done or call.backend is None:
            super().on_data_run(sid, payloads)
            return
        self.forward_run(sid, payloads, call.backend, call.bsid)

    def _client_data(self, call: Call, payload: Any, flow_len: int, end: bool) -> None:
        if end:
            call.c_in_done = True
        if call.backend is not None:
            self.forward(call.csid, payload, flow_len, end, call.backend, call.bsid)
            if end:
                self.release_call(call)
            return
        if call.held is None:  # routed to nowhere (failed): drop
            self.credit(0, flow_len)
            return
        call.held.append((payload, end, flow_len))
        call.held_bytes += flow_len
        call.held_payload += len(payload)
        if call.answer is not None:
            if end:
                self._answer(call, call.answer)
        elif call.waiting and call.klass in _FIRST_MESSAGE:
            self._try_first_message(call)

    def _try_first_message(self, call: Call) -> None:
        if not call.waiting or call.held is None or call.first_decoded:
            return
        try:
            if call.held_payload < call.first_size:  # wait for the rest without re-joining
                if call.c_in_done:
                    raise wire.DecodeError("request ended before its first message")
                return
            message = wire.first_message(call.held_message())
            if message is None:
                if call.held_payload >= 5:  # the prefix is in: wait for 5 + size bytes
                    call.first_size = 5 + wire.message_size(call.held_message(5))
                if call.c_in_done:
                    raise wire.DecodeError("request ended before its first message")
                return
            info = wire.decode_solve(message) if call.klass is wire.CallClass.SOLVE else None
            if info is not None:
                call.solve_ref = info.ref
            ref = "" if info else wire.history_ref(call.path, message)
        except wire.DecodeError as exc:
            self.end_with_error(call, errors.BadRequest(f"cannot route {call.path}: {exc}"))
            return
        call.first_decoded = True
        assert self.placement is not None
        now = self.hub.now()
        if info is not None:
            if self.draining:
                self.end_with_error(call, errors.ShuttingDown(
                    "the gateway is shutting down and takes no new builds"))
                return
            self._apply(self.placement.solve(call.csid, info, now, self.pick))
        elif call.klass is wire.CallClass.HISTORY:
            # The Ref's owner if known; else the control server finds it (or merges all).
            owner = self.hub.locate(ref) if ref else None
            if owner is not None:
                self.placement.history_replica = owner
            self._route(call, owner or self.hub.control_id)
        elif ref:
            self._apply(self.placement.follower(call.csid, ref, now, self.hub.locate))
        else:
            self._apply(self.placement.other(call.csid, self.pick))

    def on_rst(self, sid: int, code: int) -> None:
        call = self.calls.pop(sid, None)
        self.forget_credit(sid)
        if call is None:
            return
        call.c_in_done = call.c_out_done = True
        self._drop_out(call)
        self._forget(call)
        self._drop_held(call)
        self._abort_backend(call, code if code != fr.NO_ERROR else fr.CANCEL, result="cancelled")
        self._closed_out(call)

    def on_sent(self, sid: int, n: int) -> None:
        call = self.calls.get(sid)
        if call is not None and (backend := call.backend) is not None:
            bsid = call.bsid if backend.calls.get(call.bsid) is call else 0
            if self.paused:
                self.defer_credit(backend, bsid, n)
            else:
                backend.credit(bsid, n)

    def on_end(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        call.c_out_done = True
        if call.rst_after_end and not call.c_in_done:
            self.out.append(fr.rst_stream(sid, fr.NO_ERROR))
            call.c_in_done = True
            self._drop_held(call)
        self.release_call(call)

    # ---- carrying out decisions ------------------------------------------------------------

    def _apply(self, decisions: list[Decision]) -> None:
        for d in decisions:
            call = self.calls.get(d.stream)
            if isinstance(d, Placed):
                self._tickets.pop(d.stream, None)
                self.hub.build_placed(d, call)
            elif isinstance(d, Enqueue):
                self._enqueue(d)
            elif call is None:
                continue
            elif isinstance(d, Route):
                self._route(call, d.replica)
            elif isinstance(d, Fail):
                self._tickets.pop(d.stream, None)
                self.end_with_error(call, d.error)
            elif isinstance(d, Waiting):
                self._wait_shown(call, d.ref)
            elif isinstance(d, Unlocated):
                if call.klass is wire.CallClass.STATUS:  # the control server finds the owner
                    self._route(call, self.hub.control_id)
                else:
                    method = call.path.rsplit("/", 1)[-1]
                    self.end_with_error(call, errors.NotFound(
                        f"forwarding {method}: no such job {d.ref}"))
        if self.draining:
            self._refuse_waiting()
        self._reschedule()

    def _route(self, call: Call, replica: str) -> None:
        call.waiting = False
        call.replica = replica
        if call.vertex is not None:  # the wait is over: close the gateway's vertex
            self._send_vertex(call, done=True)
            call.drop_resp_headers = True
        if replica == self.hub.control_id:  # the pool is the gateway's word, not the client's
            call.headers = [*(h for h in call.headers if h[0] != POOL_HEADER),
                            (POOL_HEADER, self.pool.encode())]
        elif call.klass is wire.CallClass.LLB and call.path.endswith("/Ping"):
            if self.hub.pools[self.pool].pong is None:
                call.capture = []
        self.hub.open_upstream(call, replica)

    # ---- admission: queued builds and the wait they show ----------------------------------

    def _enqueue(self, d: Enqueue) -> None:
        if self.draining:
            self.rejected(d.stream, errors.ShuttingDown(
                "the gateway is shutting down and takes no new builds"))
            return
        waiter = Waiter(d.ref, d.internal, d.key, d.target, 0.0, 0.0, handle=(self, d.stream),
                        tenant=self.tenant)
        refused = self.hub.enqueue(self.pool, waiter)
        if refused is None:
            self._tickets[d.stream] = waiter.ticket
        else:
            self.rejected(d.stream, refused)

    def admitted(self, stream: int, replica: str, outcome: Outcome, waited: float) -> None:
        """Admission found a slot for a queued Solve of this connection."""
        self._tickets.pop(stream, None)
        if self.placement is None or self.closed:
            return
        log.info("build admitted", extra={"pool": self.pool, "replica": replica,
                                          "waited_s": round(waited, 3)})
        self._apply(self.placement.admitted(stream, replica, outcome, self.hub.now(),
                                            self.pick))

    def rejected(self, stream: int, error: errors.GatewayError) -> None:
        self._tickets.pop(stream, None)
        if self.placement is None or self.closed:
            return
        self._apply(self.placement.reject(stream, error, self.hub.now(), self.pick))

    def show_wait(self, stream: int, label: str) -> None:
        """A queued Solve's wait changed (position, replicas starting): update its vertex."""
        solve = self.calls.get(stream)
        if solve is None or solve.build is not None:
            return
        for call in self.calls.values():
            if call.vertex is not None and call.vertex[2] != label and call.replica is None:
                if call.vertex_ref == solve.solve_ref:
                    call.vertex = (call.vertex[0], call.vertex[1], label)
                    self._send_vertex(call, done=False)

    def _wait_shown(self, call: Call, ref: str) -> None:
        """A held Status or LLBBridge call of a queued build."""
        if call.klass is wire.CallClass.STATUS and call.vertex is None and not self.closed:
            digest = "sha256:" + hashlib.sha256(b"gateway-wait/" + ref.encode()).hexdigest()
            now_ns = time.time_ns()
            call.vertex = (digest, now_ns, self.hub.wait_label(self.pool, self._ahead_of(ref)))
            call.vertex_ref = ref
            headers = [*_OK_HEADERS, (b"buildkit-current-timestamp", _rfc3339(now_ns))]
            self.sched.headers(call.csid, headers, self.out, end_stream=False)
            call.resp_headers_sent = True
            self._send_vertex(call, done=False)
        elif call.klass is wire.CallClass.LLB and call.path.endswith("/Ping"):
            pong = self.hub.pools[self.pool].pong
            if pong is not None:  # answered from the pool's cache (the client allows 15 s)
                assert self.placement is not None
                self.placement.forget(call.csid, self.hub.now())
                self._answer(call, pong)

    def _ahead_of(self, ref: str) -> int:
        for stream, ticket in self._tickets.items():
            solve = self.calls.get(stream)
            if solve is not None and solve.solve_ref == ref:
                return self.hub.pools[self.pool].queue.ahead(ticket)
        return 0

    def _send_vertex(self, call: Call, *, done: bool) -> None:
        assert call.vertex is not None
        digest, started, label = call.vertex
        name = WAIT_NAME if done else f"{WAIT_NAME}: {label}"
        message = wire.status_vertex(digest=digest, name=name, started_ns=started,
                                     completed_ns=time.time_ns() if done else None)
        self.sched.data(call.csid, wire.frame_message(message), False, self.out)
        self.mark()
        if done:
            call.vertex = None

    def _answer(self, call: Call, body: bytes) -> None:
        """Answers a call with an OK response the gateway has at hand."""
        call.waiting = False
        self._drop_held(call)
        call.resp_headers_sent = True
        # The rest of the request is not needed: RST_STREAM(NO_ERROR) once the trailers are
        # written (on_end, which also releases the call), never before them.
        call.rst_after_end = not call.c_in_done
        self.sched.headers(call.csid, _OK_HEADERS, self.out, end_stream=False)
        self.sched.data(call.csid, body, False, self.out)
        self.sched.headers(call.csid, _OK_TRAILERS, self.out, end_stream=True)
        self.mark()

    def _forget(self, call: Call) -> None:
        """A call ended by the client before it was routed: it waits nowhere any more."""
        ticket = self._tickets.pop(call.csid, None)
        if ticket is not None:
            self.hub.dequeue(self.pool, ticket)
        if call.waiting and self.placement is not None:
            self.placement.forget(call.csid, self.hub.now())
            self._reschedule()

    def _reschedule(self) -> None:
        if self.placement is None or self.closed:
            return
        when = self.placement.deadline()
        if when is not None:
            when = max(when, self.hub.now())  # -inf: at once
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
            self._apply(self.placement.expire(self.hub.now(), self.pick, self.hub.locate))
        flush_dirty()

    # ---- ending calls ----------------------------------------------------------------------

    def end_with_error(self, call: Call, err: errors.GatewayError) -> None:
        """Ends the client stream with a gRPC error (and the backend stream, if any)."""
        self._abort_backend(call, fr.CANCEL, result=err.build_result)
        self._forget(call)
        call.waiting = False
        self._drop_held(call)
        if not call.c_out_done and not self.closed:
            self._drop_out(call)
            trailers = errors.trailers(err.code, err.message,
                                       headers_sent=call.resp_headers_sent)
            # the stream's queue is dropped: written now, so encoded now (wire order)
            self.out.append(self.header_frames(call.csid, trailers, True))
            call.c_out_done = True
            if not call.c_in_done:
                self.out.append(fr.rst_stream(call.csid, fr.NO_ERROR))
                call.c_in_done = True
            self.mark()
        self.hub.call_failed(call, err)
        self.release_call(call)

    def _drop_out(self, call: Call) -> None:
        """Drops what waits to be written to the client; the replica gets its credit back."""
        dropped = self.sched.close(call.csid)
        if dropped and call.backend is not None:
            call.backend.credit(0, dropped)

    def refuse(self, call: Call) -> None:
        """The replica never processed the call: REFUSED_STREAM, which gRPC clients retry."""
        if call.build is not None:
            self.hub.build_finished(call, "refused")
        self._drop_out(call)
        self.send(fr.rst_stream(call.csid, fr.REFUSED_STREAM))
        call.c_in_done = call.c_out_done = True
        self.release_call(call)

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
        if not (call.b_out_done and call.b_in_done) and not backend.closed:
            # Either half still open on the replica (a half-closed Solve still runs there):
            # reset it, so a cancel reaches the daemon.
            backend.send(fr.rst_stream(call.bsid, code))
        call.b_out_done = call.b_in_done = True
        backend.release(call)

    def release_call(self, call: Call) -> None:
        if call.c_in_done and call.c_out_done and self.calls.get(call.csid) is call:
            del self.calls[call.csid]
            self.forget_credit(call.csid)
            self.sched.close(call.csid)
            self._closed_out(call)

    def _closed_out(self, call: Call) -> None:
        """A client stream is gone (both halves done, or reset): the bookkeeping after it."""
        self.hub.stream_closed(call)
        if self.guard is not None and not self.calls:
            self.guard.calls_changed(0)
        if call.build is not None:  # a Solve that ended without trailers frees its slot too
            self.hub.build_finished(call, "unknown")
        if not self.accepting and not self.calls:
            self.finish()
        elif call.klass is wire.CallClass.SOLVE:
            self._maybe_goaway()
