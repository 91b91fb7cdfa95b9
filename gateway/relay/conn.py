"""One HTTP/2 connection of the relay, either hop: frames in, frames out, per-hop state.

Design: an asyncio Protocol that parses each read with `FrameReader`, handles everything that is
per hop (SETTINGS and ACKs, PING, WINDOW_UPDATE, GOAWAY, header-block assembly and HPACK
decoding, receive-credit batching) and hands stream events to the subclass: `ClientConn` (the
gateway as server) and `BackendConn` (the gateway as client of a replica). Outgoing frames are
appended to `out` and written in one `writelines` per wake-up: a connection that gets frames for
another marks it dirty and `flush_dirty()` writes every dirty connection once.

Receive credit: DATA counts against the windows the gateway granted; credit is returned after
the payload was forwarded (or dropped), in batches: a WINDOW_UPDATE once `CREDIT_BATCH` (64 KiB,
or a quarter of the window if that is less) is pending. Small batches pace the sender by what
leaves towards the other hop, while the large window still lets it run ahead. With 1 MiB batches
the benchmark's work ends (bench/README.md) gave 0.78-0.95 of direct in our runs, 0.85-1.01 with
64 KiB; the likely reason is that a client then sent 1 MiB bursts, and reading them kept the
gateway busy while the replica waited for its next window's worth. Bytes outstanding beyond the
granted connection window are a FLOW_CONTROL_ERROR, which also caps what a connection can make
the gateway buffer.

A replica connection is shared by many clients, so there the connection-level credit goes back
as DATA arrives (`credit_on_receipt`), and only the stream's credit waits for the forwarding:
what a stalled client holds is its own streams' windows (`--replica-stream-window` each), never
the connection window the other clients' streams need. What a replica makes the gateway buffer
is then bounded by its streams' windows, not by the connection window (the replica is trusted
to honour them).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.config import RelaySettings
from gateway.h2 import frames as fr
from gateway.h2.flow import Chunk, SendScheduler
from gateway.h2.headers import HeaderDecoder, HeaderEncoder, Headers

log = logging.getLogger("gateway.relay")

# Receive credit returned per WINDOW_UPDATE (see the module docstring). One byte above the
# default window: a peer that has not applied our SETTINGS yet gets its stream credit only once
# it has, which is harmless, as both hops send SETTINGS (and the connection's extra window) first.
CREDIT_BATCH = 1 << 16
FRAMES_PER_TURN = 1000  # frames of one read handled in one turn of the event loop

GOAWAY_LINGER = 5.0  # seconds a connection ended with GOAWAY may take to read the rest

_dirty: list[H2Conn] = []


def flush_dirty() -> None:
    """Writes the pending output of every connection that got frames since the last flush."""
    while _dirty:
        conn = _dirty.pop()
        conn.dirty = False
        conn.flush()


class H2Conn(asyncio.Protocol):
    """Per-hop HTTP/2 machinery shared by both sides of the relay."""

    role = "?"
    rx_bytes: list[int]  # Metrics.relayed: bytes read per hop, indexed by `rx_index`
    rx_index: int
    errors: Any  # the Counter of HTTP/2 protocol errors, by peer and kind

    credit_on_receipt = False  # connection credit as DATA arrives (shared replica connections)

    def __init__(self, relay: RelaySettings, *, name: str,
                 connection_window: int | None = None,
                 stream_window: int | None = None) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.reader = fr.FrameReader()
        self.max_block = relay.max_header_list  # encoded bytes of one header block
        self.decoder = self.header_decoder(relay)  # may lower max_block (clients)
        # Blocks toward the peer index into a table kept in step with its decoder, so they are
        # encoded in the order they go on the wire: `header_frames`, called as they are written
        # (requests toward a replica at once; responses by the scheduler, behind their data).
        self.encoder = HeaderEncoder()
        # Its callbacks (bound methods, a cycle) are set once connected: a connection that never
        # is (a failed TLS handshake, a failed dial) is freed by reference counting alone.
        self.sched = SendScheduler()
        self.out: list[Chunk] = []
        self.dirty = False
        self.closed = False
        self.eof_sent = False  # our side is shut (FIN sent): nothing more can be written
        self.peer_max_frame = fr.DEFAULT_MAX_FRAME_SIZE
        self.peer_max_streams = 2**31
        # receive side
        self._stream_window = stream_window or relay.stream_window
        self._conn_window = connection_window or relay.connection_window
        self._stream_credit_at = min(self._stream_window // 4, CREDIT_BATCH)
        self._conn_credit_at = min(self._conn_window // 4, CREDIT_BATCH)
        self._pending_conn_credit = 0
        self._pending_stream_credit: dict[int, int] = {}
        self._outstanding = 0  # DATA bytes received and not yet credited back
        self._block: tuple[int, int, list[bytes]] | None = None  # (sid, flags, chunks)
        self._block_size = 0
        # The peer does not read (its socket buffer is full): what is written its way is
        # credited to the source only once it reads again (`return_deferred_credit`).
        self.paused = False
        self.deferred: list[tuple[H2Conn, int, int]] = []
        self._input_paused: set[str] = set()  # why reading is paused ("slice", "write")
        self.closing = False  # GOAWAY sent or closing: nothing more is read
        self._linger_abort: asyncio.TimerHandle | None = None
        self._later: tuple[list[fr.Frame], int] | None = None  # the rest of a long read

    # ---- output ----------------------------------------------------------------------------

    def mark(self) -> None:
        if not self.dirty:
            self.dirty = True
            _dirty.append(self)

    def flush(self) -> None:
        if self.out:
            out, self.out = self.out, []
            if self.transport is not None and not self.closed and not self.eof_sent:
                self.transport.writelines(out)

    def send(self, data: bytes) -> None:
        self.out.append(data)
        self.mark()

    def header_decoder(self, relay: RelaySettings) -> HeaderDecoder:
        return HeaderDecoder(max_header_list_size=relay.max_header_list)

    def local_settings(self) -> list[tuple[int, int]]:
        return [  # SETTINGS_HEADER_TABLE_SIZE stays 4096: peers index repeated headers
            (fr.SETTINGS_INITIAL_WINDOW_SIZE, self._stream_window),
            (fr.SETTINGS_MAX_HEADER_LIST_SIZE, self.relay.max_header_list),
        ]

    def send_preface(self) -> None:
        self.out.append(fr.settings(self.local_settings()))
        extra = self._conn_window - fr.DEFAULT_WINDOW
        if extra > 0:
            self.out.append(fr.window_update(0, extra))
        self.mark()

    def credit(self, sid: int, n: int) -> None:
        """Returns receive credit for `n` bytes of stream `sid` (0: connection only); with
        `credit_on_receipt` the connection's part went back on arrival already."""
        if n <= 0:
            return
        if not self.credit_on_receipt:
            self._credit_connection(n)
        if sid:
            pending = self._pending_stream_credit.get(sid, 0) + n
            if pending >= self._stream_credit_at:
                self.out.append(fr.window_update(sid, pending))
                pending = 0
                self.mark()
            self._pending_stream_credit[sid] = pending

    def _credit_connection(self, n: int) -> None:
        self._pending_conn_credit += n
        if self._pending_conn_credit >= self._conn_credit_at:
            self.out.append(fr.window_update(0, self._pending_conn_credit))
            self._outstanding -= self._pending_conn_credit
            self._pending_conn_credit = 0
            self.mark()

    def forget_credit(self, sid: int) -> None:
        self._pending_stream_credit.pop(sid, None)

    def header_frames(self, sid: int, headers: Headers, end_stream: bool) -> bytes:
        """The HEADERS (+ CONTINUATION) frames of `headers`, encoded with the peer's table: for
        frames written now, after every block encoded before (see `encoder`)."""
        return fr.header_block(sid, self.encoder.encode(headers), end_stream=end_stream,
                               max_frame=self.peer_max_frame)

    def goaway(self, code: int, message: str, last_sid: int = 0) -> None:
        """Sends GOAWAY (once) and closes; a peer that does not read what is left is cut off
        after GOAWAY_LINGER seconds (a closing transport waits for its buffer to drain)."""
        if self.closed or self.closing:
            return
        self.out.append(fr.goaway(last_sid, code, message.encode()[:256]))
        self.flush()
        self.close()
        self._linger_abort = asyncio.get_running_loop().call_later(GOAWAY_LINGER, self.abort)

    def close(self) -> None:
        self.closing = True  # nothing more is read from the peer, even a waiting slice
        self._later = None
        if self.transport is not None and not self.closed:
            self.transport.close()

    def lost(self) -> None:
        """The transport is gone: what every subclass's connection_lost starts with."""
        self.closed = True
        self._later = None
        if self._linger_abort is not None:
            self._linger_abort.cancel()
            self._linger_abort = None

    def abort(self) -> None:
        """Drops the connection at once, whatever is still buffered for the peer."""
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # ---- input -----------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.sched.on_sent = self.on_sent
        self.sched.on_end = self.on_end
        self.sched.header_frames = self.header_frames

    def data_received(self, data: bytes | memoryview) -> None:
        self.rx_bytes[self.rx_index] += len(data)
        if self.closing:  # after our GOAWAY: nothing more is processed
            return
        try:
            self.process(data)
        except fr.ProtocolError as exc:
            self._protocol_error(exc)
        flush_dirty()

    def _protocol_error(self, exc: fr.ProtocolError) -> None:
        self.errors.labels(self.role, fr.ERROR_NAMES.get(exc.code, hex(exc.code))).inc()
        log.warning(
            "http2 protocol error",
            extra={"conn": self.name, "role": self.role, "code": fr.ERROR_NAMES.get(exc.code),
                   "error": str(exc)},
        )
        self.on_protocol_error(exc)
        self.goaway(exc.code, str(exc), self.last_stream_id())

    def pause_input(self, reason: str) -> None:
        """Stops reading from the peer until every reason given is withdrawn."""
        if not self._input_paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._input_paused.add(reason)

    def resume_input(self, reason: str) -> None:
        self._input_paused.discard(reason)
        if not self._input_paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def process(self, data: bytes | memoryview) -> None:
        """Handles the frames of one read (after those of earlier reads still waiting)."""
        frames = self.reader.feed(data)
        if self._later is not None:  # the rest of a long read is waiting: keep the order
            self._later[0].extend(frames)
            return
        self._handle(frames, 0)

    def _continue(self) -> None:
        """The next slice of a long read (see `_handle`)."""
        if self._later is None or self.closed:
            return
        frames, start = self._later
        self._later = None
        try:
            self._handle(frames, start)
        except fr.ProtocolError as exc:
            self._protocol_error(exc)
        except Exception:  # a bug: in a loop callback nobody else would end the connection
            log.exception("connection failed", extra={"conn": self.name, "role": self.role})
            self.abort()
        if self._later is None:
            self.resume_input("slice")
        flush_dirty()

    def _handle(self, frames: list[fr.Frame], start: int) -> None:
        """Handles frames[start:], at most FRAMES_PER_TURN of them now.

        A read of many small frames (a flood: 256 KiB holds 20,000 RST_STREAMs) is handled in
        slices, one per turn of the event loop, with reading paused meanwhile, so no connection
        holds the loop for long. A read of DATA frames never comes near the limit.

        DATA is the hot path. Consecutive unpadded DATA frames of one stream that do not end it
        (a flowing upload or download: most frames of most reads) are handed over as one run
        (`on_data_run`); a frame that ends its stream, a padded one, or any other frame first
        hands over the run collected so far, so every stream's frames keep their order.
        """
        if len(frames) - start > FRAMES_PER_TURN:
            batch, rest = frames[start:start + FRAMES_PER_TURN], start + FRAMES_PER_TURN
        else:
            batch, rest = (frames[start:] if start else frames), 0
        on_data = self.on_data
        run: list[memoryview] = []
        run_sid = 0
        received = self._outstanding
        for ftype, flags, sid, payload, flow_len in batch:
            if ftype == 0 and sid and self._block is None:  # DATA: the hot path
                self._outstanding += flow_len
                if self._outstanding > self._conn_window:
                    raise fr.ProtocolError(fr.FLOW_CONTROL_ERROR, "peer exceeded the window")
                if sid == run_sid and not flags & 1 and flow_len == len(payload):
                    run.append(payload)
                    continue
                if run:
                    self.on_data_run(run_sid, run)
                    run = []
                if flags & 1 or flow_len != len(payload):
                    run_sid = 0
                    on_data(sid, payload, flow_len, flags & 1)
                else:
                    run_sid = sid
                    run.append(payload)
                continue
            if run:
                self.on_data_run(run_sid, run)
                run = []
                run_sid = 0
            if self._block is not None and ftype != fr.CONTINUATION:
                raise fr.ProtocolError(fr.PROTOCOL_ERROR, "header block interrupted")
            if ftype == fr.DATA:
                raise fr.ProtocolError(fr.PROTOCOL_ERROR, "DATA on stream 0")
            if ftype == fr.HEADERS:
                if not sid:
                    raise fr.ProtocolError(fr.PROTOCOL_ERROR, "HEADERS on stream 0")
                if flags & fr.FLAG_END_HEADERS:
                    self._headers_done(sid, flags, bytes(payload))
                else:
                    self._block = (sid, flags, [bytes(payload)])
                    self._block_size = len(payload)
                    self.on_block(started=True)
            elif ftype == fr.CONTINUATION:
                if self._block is None or self._block[0] != sid:
                    raise fr.ProtocolError(fr.PROTOCOL_ERROR, "unexpected CONTINUATION")
                self._block[2].append(bytes(payload))
                self._block_size += len(payload) + fr.FRAME_HEADER_LEN  # empty ones count too
                if self._block_size > self.max_block:
                    raise fr.ProtocolError(fr.ENHANCE_YOUR_CALM, "header block too large")
                if flags & fr.FLAG_END_HEADERS:
                    bsid, bflags, chunks = self._block
                    self._block = None
                    self.on_block(started=False)
                    self._headers_done(bsid, bflags, b"".join(chunks))
            elif ftype == fr.WINDOW_UPDATE:
                inc = fr.parse_u32(payload)
                if inc == 0:
                    if sid == 0:
                        raise fr.ProtocolError(fr.PROTOCOL_ERROR, "zero window increment")
                    self.on_stream_error(sid, fr.PROTOCOL_ERROR)
                    continue
                try:
                    self.sched.window_update(sid, inc, self.out)
                except fr.StreamError as exc:
                    self.on_stream_error(exc.stream_id, exc.code)
                self.mark()
            elif ftype == fr.RST_STREAM:
                if not sid:
                    raise fr.ProtocolError(fr.PROTOCOL_ERROR, "RST_STREAM on stream 0")
                self.on_control(fr.RST_STREAM)
                self.on_rst(sid, fr.parse_code(payload))
            elif ftype == fr.SETTINGS:
                if sid:
                    raise fr.ProtocolError(fr.PROTOCOL_ERROR, "SETTINGS on a stream")
                if flags & fr.FLAG_ACK:
                    continue
                self.on_control(fr.SETTINGS)
                self._apply_settings(fr.parse_settings(payload))
            elif ftype == fr.PING:
                if len(payload) != 8:
                    raise fr.ProtocolError(fr.FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
                if not flags & fr.FLAG_ACK:
                    self.on_control(fr.PING)
                    self.send(fr.ping(bytes(payload), ack=True))
            elif ftype == fr.GOAWAY:
                last, code, debug = fr.parse_goaway(payload)
                self.on_goaway(last, code, debug)
            elif ftype == fr.PUSH_PROMISE:
                raise fr.ProtocolError(fr.PROTOCOL_ERROR, "PUSH_PROMISE is disabled")
            # PRIORITY and unknown frame types are ignored (RFC 9113 sections 5.5, 6.3).
        if run:
            self.on_data_run(run_sid, run)
        if self.credit_on_receipt and self._outstanding > received:
            self._credit_connection(self._outstanding - received)
        if rest and not self.closed:
            self._later = (frames, rest)
            self.pause_input("slice")
            asyncio.get_running_loop().call_soon(self._continue)

    def _apply_settings(self, values: list[tuple[int, int]]) -> None:
        window: int | None = None
        for key, value in values:
            if key == fr.SETTINGS_INITIAL_WINDOW_SIZE:
                window = value
            elif key == fr.SETTINGS_MAX_FRAME_SIZE:
                if not fr.DEFAULT_MAX_FRAME_SIZE <= value <= 2**24 - 1:
                    raise fr.ProtocolError(fr.PROTOCOL_ERROR, "invalid SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
            elif key == fr.SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == fr.SETTINGS_ENABLE_PUSH and value > 1:
                raise fr.ProtocolError(fr.PROTOCOL_ERROR, "invalid SETTINGS_ENABLE_PUSH")
            elif key == fr.SETTINGS_HEADER_TABLE_SIZE:
                self.on_table_size(value)
        # The ACK goes out before any DATA the new window lets through: a peer may hold us to
        # its previous window until it has seen the ACK (grpc-core resets the stream otherwise).
        self.out.append(fr.SETTINGS_ACK)
        if window is not None:
            self.sched.set_initial_window(window, self.out)
        self.mark()
        self.on_settings()

    def _headers_done(self, sid: int, flags: int, block: bytes) -> None:
        headers = self.decoder.decode(block)  # always decoded: keeps the HPACK table in step
        self.on_headers(sid, headers, bool(flags & fr.FLAG_END_STREAM))

    # ---- hooks for subclasses --------------------------------------------------------------

    def last_stream_id(self) -> int:
        return 0

    def on_data(self, sid: int, payload: memoryview, flow_len: int, end: int) -> None:
        raise NotImplementedError

    def on_data_run(self, sid: int, payloads: list[memoryview]) -> None:
        """Unpadded DATA frames of one stream, none of them its last (see `process`)."""
        for payload in payloads:
            self.on_data(sid, payload, len(payload), 0)

    def forward(self, sid: int, payload: Chunk, flow_len: int, end: bool, peer: H2Conn,
                peer_sid: int) -> None:
        """Sends one DATA frame on the other hop's stream; credit goes back for what was written
        now and for padding (the rest when it is written: `on_sent`), or at once if that stream
        is gone."""
        n = peer.sched.data(peer_sid, payload, end, peer.out)
        if not peer.dirty:
            peer.mark()
        if n < 0:
            self.credit(0, flow_len)
        elif peer.paused:
            peer.defer_credit(self, sid, flow_len - len(payload) + n)
        else:
            self.credit(sid, flow_len - len(payload) + n)

    def forward_run(self, sid: int, payloads: list[memoryview], peer: H2Conn,
                    peer_sid: int) -> None:
        """`forward` for a run of unpadded frames (see `process`)."""
        n = peer.sched.data_run(peer_sid, payloads, peer.out)
        if not peer.dirty:
            peer.mark()
        if n < 0:
            self.credit(0, sum(map(len, payloads)))
        elif peer.paused:
            peer.defer_credit(self, sid, n)
        else:
            self.credit(sid, n)

    def defer_credit(self, source: H2Conn, sid: int, n: int) -> None:
        """Bytes for this (paused) peer were written: `source` gets the credit on resume."""
        if n > 0:
            self.deferred.append((source, sid, n))

    def return_deferred_credit(self) -> None:
        deferred, self.deferred = self.deferred, []
        for source, sid, n in deferred:
            source.credit(sid if source.has_stream(sid) else 0, n)

    def has_stream(self, sid: int) -> bool:
        return False

    def on_control(self, ftype: int) -> None:
        """A RST_STREAM, PING or SETTINGS (not an ACK) arrived; may raise ProtocolError."""

    def on_block(self, *, started: bool) -> None:
        """A header block spanning frames started, or was finished."""

    def on_headers(self, sid: int, headers: Headers, end_stream: bool) -> None:
        raise NotImplementedError

    def on_rst(self, sid: int, code: int) -> None:
        raise NotImplementedError

    def on_stream_error(self, sid: int, code: int) -> None:
        self.on_rst(sid, code)
        self.send(fr.rst_stream(sid, code))

    def on_goaway(self, last_sid: int, code: int, debug: bytes) -> None:
        pass

    def on_table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: the encoder's table follows it down."""
        self.encoder.peer_limit(value)

    def on_settings(self) -> None:
        pass

    def on_protocol_error(self, exc: fr.ProtocolError) -> None:
        pass

    def on_sent(self, sid: int, n: int) -> None:
        """Queued DATA of stream `sid` was written: credit its source."""

    def on_end(self, sid: int) -> None:
        """The last frame of stream `sid` toward this peer was written."""
