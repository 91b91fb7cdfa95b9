"""`Transport` as a frame-level HTTP/2 client that behaves like grpc-go (buildctl, buildx).

The point is a second, independent HTTP/2 peer next to grpcio (`grpc_transport.GrpcTransport`),
with the habits of the real BuildKit clients that a relay must survive. Frames are written by
hand; `hpack` does header compression. No `h2`: h2's `H2Connection` applies a peer's
SETTINGS_HEADER_TABLE_SIZE to its encoder at the moment it acknowledges the SETTINGS, so it
cannot reproduce the "table used before the size change is applied" habit below.

grpc-go behaviours reproduced (each one is visible in the attributes listed under
"Introspection"):

* Connection start: preface + SETTINGS (empty unless windows are configured), then every call
  WAITS for the server's SETTINGS frame before its HEADERS go out (`connect()` itself does not
  wait, like `grpc.NewClient`). No SETTINGS within `settings_timeout` -> the connection fails.
* HPACK: one encoder with a 4096-byte dynamic table and incremental indexing, so later header
  blocks reference entries added by earlier ones (the encoder never grows the table above 4096).
  `lazy_table_size_ack=True` (default): when the server advertises a smaller
  SETTINGS_HEADER_TABLE_SIZE (the gateway advertises 0), the first `lazy_table_size_requests`
  (3) request header blocks are still encoded with the old 4096-byte table; the size change is
  applied before the next block, which then starts with the dynamic-table-size update. By
  default the SETTINGS ACK for that frame is sent when the change is applied (just before that
  block): that is RFC 7541 §4.2-conformant and is the order grpc-go produces when HEADERS are
  queued in its control buffer ahead of the settings it has just read.
  `ack_settings_early=True` ACKs at once and still uses the old table for those blocks (a
  non-conforming variant: a tolerant decoder keeps its table until it sees the size update).
  With no further requests the change is applied (and ACKed) after
  `lazy_table_size_max_delay` seconds. `lazy_table_size_ack=False` applies it at once.
* DATA frames are at most 16384 bytes, whatever SETTINGS_MAX_FRAME_SIZE the server advertises
  (grpc-go's http2MaxFrameLen); a message is framed as 5-byte prefix + payload and cut into
  frames; frames are cut to fit the smaller of the stream and connection send windows (like
  grpc-go's loopy writer). Messages are never coalesced into one frame. Unary and
  server-streaming requests carry END_STREAM on the last DATA frame; `done_writing()` sends an
  empty DATA frame with END_STREAM. Header blocks above 16384 bytes use CONTINUATION.
* Flow control: the server's connection and stream windows (INITIAL_WINDOW_SIZE deltas applied
  to open streams) are honoured exactly; MAX_CONCURRENT_STREAMS is honoured (new calls wait for
  a free slot). Receive side: 64 KiB windows; connection credit is returned on receipt once a
  quarter of the window is unacknowledged; stream credit is returned once a quarter of the
  window has been consumed (bytes of a partly received message count as consumed, complete
  messages when `recv()` takes them), so a slow reader back-pressures its own stream only.
  `dynamic_window=True` (default) runs grpc-go's BDP estimator: a PING with payload
  02 04 10 10 09 0e 07 07 on received data (preceded by a connection WINDOW_UPDATE), and when the
  estimate grows, a connection WINDOW_UPDATE plus SETTINGS_INITIAL_WINDOW_SIZE (up to 16 MiB).
* PING answered; GOAWAY: streams above last-stream-id fail UNAVAILABLE (14), new calls fail
  UNAVAILABLE, the connection closes once its remaining streams end. RST_STREAM from the server:
  CANCEL -> 1 CANCELLED, REFUSED_STREAM -> 14 UNAVAILABLE, anything else -> 13 INTERNAL (grpc-go
  itself maps FLOW_CONTROL/ENHANCE_YOUR_CALM to 8 and INADEQUATE_SECURITY to 7; this double keeps
  the simpler map). Transport loss or a protocol error by the server: every open call fails 14.
  When the server ends a stream before the client half-closed, the client sends RST_STREAM
  NO_ERROR (grpc-go does). `transparent_retry=True` retries a unary call once when its stream
  was refused unprocessed (REFUSED_STREAM before any response headers), like grpc-go's
  transparent retry; default False so refusals stay visible as 14. (grpcio servers with
  `grpc.max_concurrent_streams` refuse streams opened right after earlier ones completed, while
  they still count them; grpc-go clients hide that by this retry.) Frames above 16384 bytes
  from the server are a FRAME_SIZE_ERROR (grpc-go never raises its SETTINGS_MAX_FRAME_SIZE).
* Request headers in grpc-go's order: :method POST, :scheme http, :path, :authority,
  content-type application/grpc, user-agent grpc-go/1.x, te trailers, [grpc-timeout], then the
  custom metadata in the given order (keys lowercased, each pair a separate header field,
  reserved keys dropped like grpc-go does, `-bin` values base64 without padding). :authority is
  `authority`, else 'host:port', else 'localhost' for unix sockets (grpc-go's default there).
* Responses: trailers-only (HEADERS + END_STREAM) and headers/data/trailers; non-200 :status
  without grpc-status is mapped like grpc-go; grpc-message is percent-decoded; non-OK ->
  `RpcError(code, details, trailers)` where trailers exclude grpc-status / grpc-message /
  content-type (and other grpc-go reserved keys) but include `grpc-status-details-bin` (values
  are bytes; `-bin` values base64-decoded). A server that ends a stream without trailers ->
  13. Header blocks of any size (HEADERS + CONTINUATION) are accepted (limit 16 MiB). Messages
  above 16 MiB in either direction -> 8 RESOURCE_EXHAUSTED (receive side also resets the
  stream with CANCEL).
* Timeouts: `unary(timeout=...)` sends grpc-timeout (grpc-go's encoding; off with
  `send_grpc_timeout=False`, leaving the client's timer as the only deadline) and on expiry
  resets the stream with CANCEL and raises RpcError(4). With grpc-timeout sent, the server's own
  deadline may end the call first (status 4 from the server, no RST). Cancelling a call
  (`cancel()`, or cancelling the task awaiting `unary`, or closing a `server_stream` iterator
  early) sends RST_STREAM CANCEL; calls cancelled locally raise RpcError(1) at once (messages
  already buffered are dropped). `close()` sends GOAWAY(NO_ERROR), like grpc-go's client
  transport, and fails open calls with 1.

Introspection (plain attributes, for tests): `data_frames_sent`, `data_bytes_sent`,
`max_data_frame_sent` (largest DATA payload), `first_request_after_settings` (None before the
first request), `requests_sent`, `table_size_update_request` (1-based index of the request
whose header block carried the table-size update, or None), `settings_acks_sent`,
`server_settings` (last value of each received setting), `frames_received` (Counter by frame
type), `pings_answered`, `bdp_pings_sent`, `window_updates_sent`, `settings_sent` (non-ACK
SETTINGS frames, BDP updates included), `recv_stream_window` (current stream receive window),
`rst_sent` / `rst_received` (lists of (stream id, error code)), `goaway` ((last id, code,
debug) or None), `transparent_retries`.

Extras beyond the Protocol, mirroring `GrpcTransport`: `unary_full()` (response, headers,
trailers), `open_server_stream()` and `bidi()` return `H2Call` with `headers()`, `trailers()`,
`code()`, and `wait_closed()`. Metadata out of `headers()/trailers()/unary_full()` is
grpcio-style: str values, bytes for `-bin` keys. Metadata values given as bytes are accepted
for `-bin` keys.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import hpack

from .transport import Metadata, RpcError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
# Flags
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
# Settings
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
# Error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
SETTINGS_TIMEOUT, STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM = 0x4, 0x5, 0x6, 0x7
CANCEL, COMPRESSION_ERROR = 0x8, 0x9

GRPC_GO_FRAME_LEN = 16384  # grpc-go http2MaxFrameLen: DATA and header frames never exceed it
DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
HPACK_TABLE = 4096
BDP_LIMIT = 16 << 20
BDP_PING_DATA = bytes([2, 4, 16, 16, 9, 14, 7, 7])
MAX_MESSAGE = 16 << 20  # BuildKit client limits (containerd defaults)
MAX_HEADER_LIST = 16 << 20
GRPC_GO_USER_AGENT = "grpc-go/1.74.2"

OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED = 0, 1, 2, 4
RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE = 8, 13, 14

# grpc-go isReservedHeader: never sent from user metadata, not reported as trailers.
RESERVED_KEYS = frozenset({
    "content-type", "user-agent", "grpc-message-type", "grpc-encoding", "grpc-message",
    "grpc-status", "grpc-timeout", "te",
})
# grpc-go HTTPStatusConvTab (used when a response has no grpc-status).
HTTP_TO_GRPC = {400: INTERNAL, 401: 16, 403: 7, 404: 12, 429: UNAVAILABLE, 502: UNAVAILABLE,
                503: UNAVAILABLE, 504: UNAVAILABLE}

MetadataOut = list[tuple[str, str | bytes]]


def encode_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 9-byte header + payload."""
    return (len(payload).to_bytes(3, "big") + bytes((ftype, flags))
            + (stream_id & 0x7FFFFFFF).to_bytes(4, "big") + payload)


def rst_to_grpc(error_code: int) -> int:
    if error_code == CANCEL:
        return CANCELLED
    if error_code == REFUSED_STREAM:
        return UNAVAILABLE
    return INTERNAL


def encode_grpc_timeout(seconds: float) -> str:
    """grpc-go encodeTimeout: smallest unit whose value fits in 8 digits (rounded up)."""
    ns = max(0, int(seconds * 1e9))
    if ns <= 0:
        return "0n"
    for unit, scale in (("n", 1), ("u", 1_000), ("m", 1_000_000), ("S", 10**9),
                        ("M", 60 * 10**9)):
        value = -(-ns // scale)
        if value <= 99_999_999:
            return f"{value}{unit}"
    return f"{-(-ns // (3600 * 10**9))}H"


def _b64decode(value: bytes) -> bytes:
    return base64.b64decode(value + b"=" * (-len(value) % 4))


def _metadata_pairs(fields: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, bytes]]:
    """Decoded header fields -> (key, value bytes), reserved keys dropped, -bin decoded."""
    out: list[tuple[str, bytes]] = []
    for raw_name, value in fields:
        name = raw_name.decode("latin-1")
        if name.startswith(":") or name in RESERVED_KEYS:
            continue
        if name.endswith("-bin"):
            try:
                out.extend((name, _b64decode(part)) for part in value.split(b","))
            except ValueError:
                out.append((name, value))
        else:
            out.append((name, value))
    return out


def _grpcio_style(pairs: list[tuple[str, bytes]]) -> MetadataOut:
    return [(k, v if k.endswith("-bin") else v.decode("utf-8", "replace")) for k, v in pairs]


class _ProtocolError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Notifier:
    """Broadcast wake-up: waiters re-check their predicate after every notify()."""

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        if self._fut is None or self._fut.done():
            self._fut = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._fut)

    def notify(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)
        self._fut = None


@dataclass
class UnaryResult:
    response: bytes
    headers: MetadataOut
    trailers: MetadataOut


_END = object()


class H2Call:
    """One HTTP/2 stream carrying one gRPC call (implements the BidiCall protocol)."""

    def __init__(self, conn: H2Transport, path: str, metadata: Metadata | Sequence[
            tuple[str, str | bytes]], timeout: float | None = None) -> None:
        self._conn = conn
        self.path = path
        self.metadata = list(metadata)
        self.timeout = timeout
        self.stream_id = 0
        self._send_window = 0
        self._recv_limit = conn._stream_recv_limit
        self._recv_total = 0  # bytes received on this stream (padding included)
        self._recv_credited = 0  # bytes returned by WINDOW_UPDATE (or initial window)
        self._queued_bytes = 0  # bytes held in complete, unread messages (prefix included)
        self._buf = bytearray()
        self._messages: list[bytes] = []
        self._msg_head = 0
        self._event = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._headers: list[tuple[str, bytes]] | None = None
        self._http_status: int | None = None
        self._trailers: list[tuple[str, bytes]] = []
        self._local_closed = False  # END_STREAM sent
        self._finished = False  # stream over (remote end, reset, transport loss)
        self._error: RpcError | None = None
        self._immediate = False  # error reported before buffered messages
        self._done = asyncio.Event()
        self._opening_cancelled: RpcError | None = None
        self._start_task: asyncio.Task[None] | None = None
        self._unprocessed = False  # refused (REFUSED_STREAM / above GOAWAY last-stream-id)

    # ----- BidiCall -----
    async def send(self, message: bytes) -> None:
        """Send one message. After the server ended the call: raises its error (if not OK) or
        drops the message (like grpc-go's SendMsg returning io.EOF)."""
        await self._conn._send_message(self, bytes(message), end_stream=False)

    async def done_writing(self) -> None:
        """Half-close: an empty DATA frame with END_STREAM."""
        async with self._send_lock:
            if self._local_closed or self._finished:
                return
            self._conn._end_stream(self)

    async def recv(self) -> bytes | None:
        while True:
            if self._immediate and self._error is not None:
                raise self._error
            if self._msg_head < len(self._messages):
                msg = self._messages[self._msg_head]
                self._messages[self._msg_head] = b""
                self._msg_head += 1
                if self._msg_head > 64 and self._msg_head * 2 > len(self._messages):
                    del self._messages[:self._msg_head]
                    self._msg_head = 0
                self._queued_bytes -= 5 + len(msg)
                self._conn._maybe_credit_stream(self)
                return msg
            if self._finished:
                if self._error is not None:
                    raise self._error
                return None
            self._event.clear()
            await self._event.wait()

    def cancel(self) -> None:
        """RST_STREAM CANCEL; pending and later recv()/send() raise RpcError(1)."""
        self._conn._cancel_call(self, RpcError(CANCELLED, "context canceled"))

    # ----- extras -----
    def __aiter__(self) -> H2Call:
        return self

    async def __anext__(self) -> bytes:
        msg = await self.recv()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def headers(self) -> MetadataOut:
        """Response headers (waits for them; [] for a trailers-only response)."""
        while self._headers is None and not self._finished:
            self._event.clear()
            await self._event.wait()
        return _grpcio_style(self._headers or [])

    async def trailers(self) -> MetadataOut:
        """Trailers (waits for the end of the call)."""
        await self._done.wait()
        return _grpcio_style(self._trailers)

    async def code(self) -> int:
        await self._done.wait()
        return OK if self._error is None else self._error.code

    async def wait_closed(self) -> None:
        await self._done.wait()

    @property
    def finished(self) -> bool:
        return self._finished


class H2Transport:
    """One client HTTP/2 connection speaking gRPC like grpc-go. See the module docstring."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 authority: str, *, lazy_table_size_ack: bool = True,
                 lazy_table_size_requests: int = 3, lazy_table_size_max_delay: float = 1.0,
                 ack_settings_early: bool = False, initial_window_size: int = DEFAULT_WINDOW,
                 connection_window_size: int = DEFAULT_WINDOW, dynamic_window: bool = True,
                 user_agent: str = GRPC_GO_USER_AGENT, max_recv_message_size: int = MAX_MESSAGE,
                 max_send_message_size: int = MAX_MESSAGE, settings_timeout: float = 20.0,
                 transparent_retry: bool = False, send_grpc_timeout: bool = True) -> None:
        self._reader = reader
        self._writer = writer
        self.authority = authority
        self.lazy_table_size_ack = lazy_table_size_ack
        self.lazy_table_size_requests = lazy_table_size_requests
        self.lazy_table_size_max_delay = lazy_table_size_max_delay
        self.ack_settings_early = ack_settings_early
        self.dynamic_window = dynamic_window
        self.user_agent = user_agent
        self.max_recv_message_size = max_recv_message_size
        self.max_send_message_size = max_send_message_size
        self.transparent_retry = transparent_retry
        self.send_grpc_timeout = send_grpc_timeout
        self._loop = asyncio.get_running_loop()

        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._streams: dict[int, H2Call] = {}
        self._next_stream_id = 1
        self._notifier = _Notifier()
        self._settings_seen = False
        self._closed: RpcError | None = None
        self._closing = False
        # outbound flow control (server's windows)
        self._conn_send_window = DEFAULT_WINDOW
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_streams: int | None = None
        self._peer_max_frame = GRPC_GO_FRAME_LEN
        # inbound flow control (our windows)
        self._stream_recv_limit = initial_window_size
        self._conn_recv_limit = connection_window_size
        self._conn_recv_window = connection_window_size
        self._conn_unacked = 0
        # header block being assembled (HEADERS + CONTINUATION)
        self._hdr_stream = 0
        self._hdr_end_stream = False
        self._hdr_buf: bytearray | None = None
        # lazy HPACK table-size change
        self._pending_table_size: int | None = None
        self._lazy_blocks_left = 0
        self._deferred_acks = 0
        self._lazy_timer: asyncio.TimerHandle | None = None
        # BDP estimator (grpc-go bdp_estimator.go)
        self._bdp = initial_window_size
        self._bdp_sample = 0
        self._bdp_sent = False
        self._bdp_sent_at = 0.0
        self._bdp_rtt = 0.0
        self._bdp_count = 0
        self._bdp_bwmax = 0.0

        # introspection
        self.data_frames_sent = 0
        self.data_bytes_sent = 0
        self.max_data_frame_sent = 0
        self.first_request_after_settings: bool | None = None
        self.requests_sent = 0
        self.table_size_update_request: int | None = None
        self.settings_acks_sent = 0
        self.settings_sent = 0
        self.server_settings: dict[int, int] = {}
        self.frames_received: Counter[int] = Counter()
        self.pings_answered = 0
        self.bdp_pings_sent = 0
        self.window_updates_sent = 0
        self.rst_sent: list[tuple[int, int]] = []
        self.rst_received: list[tuple[int, int]] = []
        self.goaway: tuple[int, int, bytes] | None = None
        self.transparent_retries = 0

        settings = b""
        if initial_window_size != DEFAULT_WINDOW:
            settings += (SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big")
                         + initial_window_size.to_bytes(4, "big"))
        out = [PREFACE, encode_frame(SETTINGS, 0, 0, settings)]
        self.settings_sent += 1
        if connection_window_size > DEFAULT_WINDOW:
            out.append(encode_frame(WINDOW_UPDATE, 0, 0,
                                    (connection_window_size - DEFAULT_WINDOW).to_bytes(4, "big")))
            self.window_updates_sent += 1
        self._writer.writelines(out)
        self._settings_timer = self._loop.call_later(settings_timeout, self._settings_timed_out)
        self._reader_task = asyncio.create_task(self._read_loop(), name="h2-transport-reader")

    @classmethod
    async def connect(cls, host: str, port: int, *, authority: str | None = None,
                      unix_path: str | None = None, tls: ssl.SSLContext | None = None,
                      source: str | None = None, **options: object) -> H2Transport:
        """Open the connection and send the preface; does not wait for the server's SETTINGS
        (calls do). `tls`: TLS first, as that context says (its ALPN offer included, or none,
        as the buildx remote driver). `source`: the local address to connect from (another
        loopback address is another client). `options` are the keyword arguments of
        `__init__`."""
        try:
            if unix_path is not None:
                reader, writer = await asyncio.open_unix_connection(unix_path)
                default_authority = "localhost"
            else:
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None,
                    local_addr=(source, 0) if source else None)
                default_authority = f"{host}:{port}"
        except OSError as e:
            raise RpcError(UNAVAILABLE, f"connection error: {e}") from None
        return cls(reader, writer, authority or default_authority, **options)  # type: ignore[arg-type]

    def extra_info(self, name: str) -> object:
        """The connection's transport information (e.g. "ssl_object", "peername")."""
        return self._writer.get_extra_info(name)

    async def __aenter__(self) -> H2Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ================= public calls =================
    async def unary(self, path: str, request: bytes, metadata: Metadata = (),
                    *, timeout: float | None = None) -> bytes:
        return (await self.unary_full(path, request, metadata, timeout=timeout)).response

    async def unary_full(self, path: str, request: bytes,
                         metadata: Metadata | Sequence[tuple[str, str | bytes]] = (),
                         *, timeout: float | None = None) -> UnaryResult:
        """A unary call, also returning response headers and trailers (grpcio-style)."""
        call = H2Call(self, path, metadata, timeout)

        async def run() -> UnaryResult:
            nonlocal call
            try:
                return await run_once()
            except RpcError:
                if not (self.transparent_retry and call._unprocessed and self._closed is None
                        and self.goaway is None):
                    raise
            self.transparent_retries += 1
            call = H2Call(self, path, metadata, timeout)
            return await run_once()

        async def run_once() -> UnaryResult:
            await self._open(call)
            await self._send_message(call, bytes(request), end_stream=True)
            msg = await call.recv()
            if msg is None:
                raise RpcError(INTERNAL, "grpc: server returned no message for a unary call",
                               list(call._trailers))
            extra = await call.recv()
            if extra is not None:
                self._cancel_call(call, RpcError(INTERNAL, "cardinality violation: expected "
                                                 "<EOF> for non server-streaming RPCs"))
                raise RpcError(INTERNAL, "cardinality violation: expected <EOF> for non "
                               "server-streaming RPCs, but received another message")
            return UnaryResult(msg, _grpcio_style(call._headers or []),
                               _grpcio_style(call._trailers))

        try:
            if timeout is None:
                return await run()
            try:
                async with asyncio.timeout(timeout):
                    return await run()
            except TimeoutError:
                err = RpcError(DEADLINE_EXCEEDED, "context deadline exceeded")
                self._cancel_call(call, err)
                raise err from None
        except asyncio.CancelledError:
            self._cancel_call(call, RpcError(CANCELLED, "context canceled"))
            raise

    def open_server_stream(self, path: str, request: bytes,
                           metadata: Metadata | Sequence[tuple[str, str | bytes]] = ()
                           ) -> H2Call:
        """A server-streaming call as an H2Call (recv() until None, or `async for`). The
        stream opens in the background; errors surface from recv()."""
        call = H2Call(self, path, metadata)

        async def start() -> None:
            try:
                await self._open(call)
                await self._send_message(call, bytes(request), end_stream=True)
            except RpcError as e:
                self._finish(call, e, immediate=True)
            except asyncio.CancelledError:
                self._cancel_call(call, RpcError(CANCELLED, "context canceled"))
                raise

        task = asyncio.create_task(start())
        call._start_task = task  # keep a reference
        return call

    async def server_stream(self, path: str, request: bytes,
                            metadata: Metadata = ()) -> AsyncIterator[bytes]:
        call = self.open_server_stream(path, request, metadata)
        try:
            while (msg := await call.recv()) is not None:
                yield msg
        finally:
            if not call._finished:
                call.cancel()

    async def bidi(self, path: str,
                   metadata: Metadata | Sequence[tuple[str, str | bytes]] = ()) -> H2Call:
        """Open a stream (HEADERS sent before this returns)."""
        call = H2Call(self, path, metadata)
        try:
            await self._open(call)
        except asyncio.CancelledError:
            self._cancel_call(call, RpcError(CANCELLED, "context canceled"))
            raise
        return call

    async def close(self) -> None:
        """GOAWAY(NO_ERROR) then close; open calls fail with 1 CANCELLED."""
        if self._closed is None:
            self._write([encode_frame(GOAWAY, 0, 0, (0).to_bytes(4, "big")
                                      + NO_ERROR.to_bytes(4, "big")
                                      + b"client transport shutdown")])
            self._fail_connection(RpcError(CANCELLED,
                                           "grpc: the client connection is closing"))
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def recv_stream_window(self) -> int:
        """Current stream receive window (initial value for new streams)."""
        return self._stream_recv_limit

    def active_streams(self) -> int:
        return len(self._streams)

    async def update_windows(self, stream_window: int, connection_window: int | None = None
                             ) -> None:
        """Raise the receive windows like grpc-go's BDP update: SETTINGS_INITIAL_WINDOW_SIZE and
        a connection WINDOW_UPDATE for the difference."""
        self._grow_windows(stream_window, connection_window or stream_window)
        await self._drain()

    # ================= stream lifecycle =================
    def _check_usable(self) -> None:
        if self._closed is not None:
            raise RpcError(self._closed.code, self._closed.details)
        if self.goaway is not None or self._closing:
            raise RpcError(UNAVAILABLE, "transport is closing (GOAWAY received)")

    async def _open(self, call: H2Call) -> None:
        while True:
            if call._opening_cancelled is not None:
                raise call._opening_cancelled
            self._check_usable()
            if self._settings_seen and (self._peer_max_streams is None
                                        or len(self._streams) < self._peer_max_streams):
                break
            await self._notifier.wait()
        sid = self._next_stream_id
        self._next_stream_id += 2
        call.stream_id = sid
        call._send_window = self._peer_initial_window
        call._recv_limit = self._stream_recv_limit
        call._recv_credited = self._stream_recv_limit
        self._streams[sid] = call
        if self.first_request_after_settings is None:
            self.first_request_after_settings = self._settings_seen
        block = self._encode_request_headers(call)
        self._write(self._header_frames(sid, block, end_stream=False))
        await self._drain()

    def _request_headers(self, call: H2Call) -> list[tuple[bytes, bytes]]:
        fields: list[tuple[bytes, bytes]] = [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", call.path.encode()),
            (b":authority", self.authority.encode()),
            (b"content-type", b"application/grpc"), (b"user-agent", self.user_agent.encode()),
            (b"te", b"trailers"),
        ]
        if call.timeout is not None and self.send_grpc_timeout:
            fields.append((b"grpc-timeout", encode_grpc_timeout(call.timeout).encode()))
        for key, value in call.metadata:
            k = key.lower()
            if k.startswith(":") or k in RESERVED_KEYS:
                continue
            v = value.encode() if isinstance(value, str) else bytes(value)
            if k.endswith("-bin"):
                v = base64.b64encode(v).rstrip(b"=")
            fields.append((k.encode(), v))
        return fields

    def _encode_request_headers(self, call: H2Call) -> bytes:
        if self._pending_table_size is not None and self._lazy_blocks_left <= 0:
            self._apply_table_size()
        resized = self._encoder.header_table.resized
        block = self._encoder.encode(self._request_headers(call))
        self.requests_sent += 1
        if resized and self.table_size_update_request is None:
            self.table_size_update_request = self.requests_sent
        if self._pending_table_size is not None:
            self._lazy_blocks_left -= 1
        return block

    def _header_frames(self, sid: int, block: bytes, *, end_stream: bool) -> list[bytes]:
        size = GRPC_GO_FRAME_LEN
        chunks = [block[i:i + size] for i in range(0, len(block), size)] or [b""]
        frames = []
        for i, chunk in enumerate(chunks):
            flags = FLAG_END_HEADERS if i == len(chunks) - 1 else 0
            if i == 0:
                frames.append(encode_frame(HEADERS, flags | (FLAG_END_STREAM if end_stream
                                                             else 0), sid, chunk))
            else:
                frames.append(encode_frame(CONTINUATION, flags, sid, chunk))
        return frames

    def _stream_over_error(self, call: H2Call) -> bool:
        """True if the stream is finished OK (sends are dropped); raises its error otherwise."""
        if call._opening_cancelled is not None and not call.stream_id:
            raise call._opening_cancelled
        if call._finished:
            if call._error is not None:
                raise call._error
            return True
        return False

    async def _send_message(self, call: H2Call, message: bytes, *, end_stream: bool) -> None:
        if len(message) > self.max_send_message_size:
            raise RpcError(RESOURCE_EXHAUSTED, "trying to send message larger than max "
                           f"({len(message)} vs. {self.max_send_message_size})")
        async with call._send_lock:
            if self._stream_over_error(call):
                return
            if call._local_closed:
                raise RpcError(INTERNAL, "send after done_writing()")
            payload = memoryview(b"\x00" + len(message).to_bytes(4, "big") + message)
            off, total = 0, len(payload)
            while off < total:
                while True:
                    if self._stream_over_error(call):
                        return
                    if self._closed is not None:
                        raise RpcError(self._closed.code, self._closed.details)
                    n = min(GRPC_GO_FRAME_LEN, self._peer_max_frame, call._send_window,
                            self._conn_send_window, total - off)
                    if n > 0:
                        break
                    await self._notifier.wait()
                chunk = payload[off:off + n]
                off += n
                call._send_window -= n
                self._conn_send_window -= n
                last = end_stream and off == total
                self._write_data(call.stream_id, chunk, last)
                if last:
                    call._local_closed = True
                await self._drain()

    def _end_stream(self, call: H2Call) -> None:
        call._local_closed = True
        self._write_data(call.stream_id, b"", True)

    def _write_data(self, sid: int, chunk: bytes | memoryview, end_stream: bool) -> None:
        n = len(chunk)
        self.data_frames_sent += 1
        self.data_bytes_sent += n
        self.max_data_frame_sent = max(self.max_data_frame_sent, n)
        head = encode_frame(DATA, FLAG_END_STREAM if end_stream else 0, sid)
        self._write([n.to_bytes(3, "big") + head[3:], chunk])

    def _cancel_call(self, call: H2Call, error: RpcError) -> None:
        if call._finished:
            return
        if not call.stream_id:
            call._opening_cancelled = error
            self._finish(call, error, immediate=True)
            self._notifier.notify()
            return
        self._send_rst(call.stream_id, CANCEL)
        self._finish(call, error, immediate=True)

    def _send_rst(self, sid: int, code: int) -> None:
        self.rst_sent.append((sid, code))
        self._write([encode_frame(RST_STREAM, 0, sid, code.to_bytes(4, "big"))])

    def _finish(self, call: H2Call, error: RpcError | None, *, immediate: bool = False) -> None:
        if call._finished:
            return
        call._finished = True
        call._error = error
        call._immediate = immediate and error is not None
        if call.stream_id:
            self._streams.pop(call.stream_id, None)
        call._event.set()
        call._done.set()
        self._notifier.notify()
        if (self.goaway is not None or self._closing) and not self._streams \
                and self._closed is None:
            self._fail_connection(RpcError(UNAVAILABLE, "transport is closing"))

    # ================= writing =================
    def _write(self, chunks: Sequence[bytes | memoryview]) -> None:
        if self._closed is not None or self._writer.is_closing():
            return
        self._writer.writelines(chunks)

    async def _drain(self) -> None:
        if self._closed is not None:
            return
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as e:
            self._fail_connection(RpcError(UNAVAILABLE, f"connection error: {e}"))

    def _send_settings_acks(self, n: int) -> None:
        self.settings_acks_sent += n
        self._write([encode_frame(SETTINGS, FLAG_ACK, 0)] * n)

    def _apply_table_size(self) -> None:
        if self._pending_table_size is not None:
            self._encoder.header_table_size = self._pending_table_size
            self._pending_table_size = None
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self._deferred_acks:
            n, self._deferred_acks = self._deferred_acks, 0
            self._send_settings_acks(n)

    def _window_update(self, sid: int, increment: int) -> None:
        self.window_updates_sent += 1
        self._write([encode_frame(WINDOW_UPDATE, 0, sid, increment.to_bytes(4, "big"))])

    def _maybe_credit_stream(self, call: H2Call) -> None:
        if call._finished or not call.stream_id:
            return
        # bytes consumed = received - held in unread complete messages
        consumed = call._recv_total - call._queued_bytes
        pending = consumed - (call._recv_credited - call._recv_limit)
        if pending >= call._recv_limit // 4 and pending > 0:
            call._recv_credited += pending
            self._window_update(call.stream_id, pending)

    def _grow_windows(self, stream_window: int, connection_window: int) -> None:
        stream_window = min(stream_window, MAX_WINDOW)
        connection_window = min(connection_window, MAX_WINDOW)
        if connection_window > self._conn_recv_limit:
            delta = connection_window - self._conn_recv_limit
            self._conn_recv_limit = connection_window
            self._conn_recv_window += delta
            self._window_update(0, delta)
        if stream_window > self._stream_recv_limit:  # grow only (in-flight data stays valid)
            delta = stream_window - self._stream_recv_limit
            self._stream_recv_limit = stream_window
            for call in self._streams.values():
                call._recv_limit += delta
                call._recv_credited += delta
            self.settings_sent += 1
            self._write([encode_frame(SETTINGS, 0, 0, SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(
                2, "big") + stream_window.to_bytes(4, "big"))])

    # ================= reading =================
    async def _read_loop(self) -> None:
        reader = self._reader
        try:
            first = True
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                ftype, flags = head[3], head[4]
                sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                if length > GRPC_GO_FRAME_LEN:
                    raise _ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds "
                                         f"SETTINGS_MAX_FRAME_SIZE {GRPC_GO_FRAME_LEN}")
                payload = await reader.readexactly(length) if length else b""
                if first and (ftype != SETTINGS or flags & FLAG_ACK):
                    raise _ProtocolError(PROTOCOL_ERROR, "first frame from the server was not "
                                         "SETTINGS")
                first = False
                self.frames_received[ftype] += 1
                self._handle_frame(ftype, flags, sid, payload)
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            reason = "EOF" if isinstance(e, asyncio.IncompleteReadError) else str(e)
            self._fail_connection(RpcError(UNAVAILABLE, f"error reading from server: {reason}"))
        except _ProtocolError as e:
            self._write([encode_frame(GOAWAY, 0, 0, (0).to_bytes(4, "big")
                                      + e.code.to_bytes(4, "big") + str(e).encode())])
            self._fail_connection(RpcError(UNAVAILABLE, f"connection error: {e}"))
        except Exception as e:  # a bug here must not hang the calls
            self._fail_connection(RpcError(UNAVAILABLE, f"h2 transport reader failed: {e!r}"))
            raise

    def _handle_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._hdr_buf is not None and (ftype != CONTINUATION or sid != self._hdr_stream):
            raise _ProtocolError(PROTOCOL_ERROR, "expected CONTINUATION")
        if ftype == DATA:
            self._on_data(flags, sid, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            if self._hdr_buf is None:
                raise _ProtocolError(PROTOCOL_ERROR, "unexpected CONTINUATION")
            self._hdr_buf += payload
            if len(self._hdr_buf) > MAX_HEADER_LIST:
                raise _ProtocolError(PROTOCOL_ERROR, "header block too large")
            if flags & FLAG_END_HEADERS:
                block, self._hdr_buf = bytes(self._hdr_buf), None
                self._on_header_block(self._hdr_stream, self._hdr_end_stream, block)
        elif ftype == RST_STREAM:
            self._on_rst(sid, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == PING:
            self._on_ping(flags, sid, payload)
        elif ftype == GOAWAY:
            self._on_goaway(sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == PUSH_PROMISE:
            raise _ProtocolError(PROTOCOL_ERROR, "received PUSH_PROMISE")
        # PRIORITY and unknown frame types are ignored

    @staticmethod
    def _strip_padding(flags: int, payload: bytes) -> bytes:
        if flags & FLAG_PADDED:
            if not payload:
                raise _ProtocolError(PROTOCOL_ERROR, "padded frame without pad length")
            pad = payload[0]
            if pad >= len(payload):
                raise _ProtocolError(PROTOCOL_ERROR, "padding exceeds frame payload")
            return payload[1:len(payload) - pad]
        return payload

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        if length > self._conn_recv_window:
            raise _ProtocolError(FLOW_CONTROL_ERROR, "connection receive window exceeded")
        # connection credit (grpc-go trInFlow.onData: returned on receipt, batched by 1/4)
        self._conn_recv_window -= length
        self._conn_unacked += length
        send_bdp = False
        if self.dynamic_window and length > 0:
            send_bdp = self._bdp_add(length)
        if self._conn_unacked >= self._conn_recv_limit // 4:
            self._return_conn_credit()
        if send_bdp:
            self._return_conn_credit()
            self.bdp_pings_sent += 1
            self._write([encode_frame(PING, 0, 0, BDP_PING_DATA)])
            self._bdp_sent_at = time.monotonic()
        data = self._strip_padding(flags, payload)
        call = self._streams.get(sid)
        if call is None:
            if sid >= self._next_stream_id:
                raise _ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # closed/reset stream: connection credit already returned
        if call._headers is None:
            self._stream_error(call, PROTOCOL_ERROR,
                               RpcError(INTERNAL, "DATA before response HEADERS"))
            return
        window = call._recv_credited - call._recv_total
        if length > window:
            self._stream_error(call, FLOW_CONTROL_ERROR, RpcError(
                INTERNAL, f"stream receive window exceeded ({length} > {window})"))
            return
        call._recv_total += length - len(data)  # padding counts as consumed at once
        buf = call._buf
        buf += data
        call._recv_total += len(data)
        while len(buf) >= 5:
            mlen = int.from_bytes(buf[1:5], "big")
            if mlen > self.max_recv_message_size:
                self._stream_error(call, CANCEL, RpcError(
                    RESOURCE_EXHAUSTED, "grpc: received message larger than max "
                    f"({mlen} vs. {self.max_recv_message_size})"))
                return
            if buf[0] != 0:
                self._stream_error(call, CANCEL, RpcError(
                    INTERNAL, f"grpc: compressed flag {buf[0]} set but no grpc-encoding "
                    "was negotiated"))
                return
            if len(buf) < 5 + mlen:
                break
            call._messages.append(bytes(buf[5:5 + mlen]))
            call._queued_bytes += 5 + mlen
            del buf[:5 + mlen]
        call._event.set()
        self._maybe_credit_stream(call)
        if flags & FLAG_END_STREAM:
            err = RpcError(INTERNAL, "server closed the stream without sending trailers")
            self._remote_end(call, err)

    def _return_conn_credit(self) -> None:
        if self._conn_unacked > 0:
            n, self._conn_unacked = self._conn_unacked, 0
            self._conn_recv_window += n
            self._window_update(0, n)

    def _bdp_add(self, n: int) -> bool:
        if self._bdp >= BDP_LIMIT:
            return False
        if not self._bdp_sent:
            self._bdp_sent = True
            self._bdp_sample = n
            self._bdp_count += 1
            return True
        self._bdp_sample += n
        return False

    def _bdp_calculate(self) -> None:
        if not self._bdp_sent:
            return
        rtt = max(time.monotonic() - self._bdp_sent_at, 1e-6)
        if self._bdp_count < 10:
            self._bdp_rtt += (rtt - self._bdp_rtt) / self._bdp_count
        else:
            self._bdp_rtt += (rtt - self._bdp_rtt) * 0.9
        self._bdp_sent = False
        bw = self._bdp_sample / (self._bdp_rtt * 1.5)
        self._bdp_bwmax = max(self._bdp_bwmax, bw)
        if (self._bdp_sample >= 0.66 * self._bdp and bw == self._bdp_bwmax
                and self._bdp != BDP_LIMIT):
            self._bdp = min(int(2 * self._bdp_sample), BDP_LIMIT)
            self._grow_windows(self._bdp, self._bdp)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
        fragment = self._strip_padding(flags, payload)
        if flags & FLAG_PRIORITY:
            if len(fragment) < 5:
                raise _ProtocolError(FRAME_SIZE_ERROR, "HEADERS priority block truncated")
            fragment = fragment[5:]
        end_stream = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_END_HEADERS:
            self._on_header_block(sid, end_stream, fragment)
        else:
            self._hdr_stream, self._hdr_end_stream = sid, end_stream
            self._hdr_buf = bytearray(fragment)

    def _on_header_block(self, sid: int, end_stream: bool, block: bytes) -> None:
        # Always decode (HPACK state is per connection), even for reset/unknown streams.
        try:
            fields = [(bytes(k), bytes(v)) for k, v in self._decoder.decode(block, raw=True)]
        except hpack.HPACKError as e:
            raise _ProtocolError(COMPRESSION_ERROR, f"HPACK decoding failed: {e}") from None
        call = self._streams.get(sid)
        if call is None:
            if sid >= self._next_stream_id:
                raise _ProtocolError(PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
            return
        status: int | None = None
        for k, v in fields:
            if k == b":status":
                try:
                    status = int(v)
                except ValueError:
                    status = None
        if call._headers is None:
            call._http_status = status
            if not end_stream:  # response headers
                content_type = dict(fields).get(b"content-type", b"")
                if status != 200 or not content_type.startswith(b"application/grpc"):
                    self._stream_error(call, PROTOCOL_ERROR,
                                       self._http_error(status, content_type))
                    return
                call._headers = _metadata_pairs(fields)
                call._event.set()
                return
            call._headers = []  # trailers-only
        elif not end_stream:
            self._stream_error(call, PROTOCOL_ERROR,
                               RpcError(INTERNAL, "HEADERS in the middle of a stream"))
            return
        # trailers (or trailers-only)
        call._trailers = _metadata_pairs(fields)
        grpc_status: int | None = None
        message = b""
        for k, v in fields:
            if k == b"grpc-status":
                try:
                    grpc_status = int(v)
                except ValueError:
                    grpc_status = UNKNOWN
            elif k == b"grpc-message":
                message = urllib.parse.unquote_to_bytes(v)
        details = message.decode("utf-8", "replace")
        err: RpcError | None
        if grpc_status is None:
            if call._http_status not in (None, 200):
                err = self._http_error(call._http_status, b"application/grpc")
                err.trailers = list(call._trailers)
            else:
                err = RpcError(INTERNAL, "server closed the stream without sending grpc-status",
                               list(call._trailers))
        elif grpc_status == OK:
            err = None
        else:
            err = RpcError(grpc_status, details, list(call._trailers))
        if err is None and call._buf:
            err = RpcError(INTERNAL, "server closed the stream in the middle of a message",
                           list(call._trailers))
        self._remote_end(call, err)

    @staticmethod
    def _http_error(status: int | None, content_type: bytes) -> RpcError:
        if status is None:
            return RpcError(INTERNAL, "malformed header: missing HTTP status")
        if status != 200:
            return RpcError(HTTP_TO_GRPC.get(status, UNKNOWN),
                            f"unexpected HTTP status code received from server: {status}")
        return RpcError(UNKNOWN, "unexpected content-type "
                        f"\"{content_type.decode('latin-1')}\"")

    def _remote_end(self, call: H2Call, error: RpcError | None) -> None:
        """The server ended the stream (END_STREAM)."""
        if not call._local_closed:
            # grpc-go: server finished while the client was still sending -> RST NO_ERROR
            self._send_rst(call.stream_id, NO_ERROR)
        self._finish(call, error)

    def _stream_error(self, call: H2Call, code: int, error: RpcError) -> None:
        self._send_rst(call.stream_id, code)
        self._finish(call, error, immediate=True)

    def _on_rst(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise _ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM payload must be 4 bytes")
        code = int.from_bytes(payload, "big")
        self.rst_received.append((sid, code))
        call = self._streams.get(sid)
        if call is None:
            if sid >= self._next_stream_id:
                raise _ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        call._unprocessed = code == REFUSED_STREAM and call._headers is None
        self._finish(call, RpcError(rst_to_grpc(code), "stream terminated by RST_STREAM "
                                    f"with error code: {code}"))

    def _on_settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & FLAG_ACK:
            if payload:
                raise _ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        if len(payload) % 6:
            raise _ProtocolError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        table_size: int | None = None
        for i in range(0, len(payload), 6):
            ident = int.from_bytes(payload[i:i + 2], "big")
            value = int.from_bytes(payload[i + 2:i + 6], "big")
            self.server_settings[ident] = value
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                table_size = value
            elif ident == SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ProtocolError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for call in self._streams.values():
                    call._send_window += delta
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not 16384 <= value <= 2**24 - 1:
                    raise _ProtocolError(PROTOCOL_ERROR, "invalid MAX_FRAME_SIZE")
                self._peer_max_frame = value
            elif ident == SETTINGS_ENABLE_PUSH and value > 1:
                raise _ProtocolError(PROTOCOL_ERROR, "invalid ENABLE_PUSH")
        if not self._settings_seen:
            self._settings_seen = True
            self._settings_timer.cancel()
        held = False
        current = self._pending_table_size
        if current is None:
            current = self._encoder.header_table_size
        if table_size is not None and min(table_size, HPACK_TABLE) < current:
            new_size = min(table_size, HPACK_TABLE)
            if self.lazy_table_size_ack and self.lazy_table_size_requests > 0:
                if self._pending_table_size is None:
                    self._lazy_blocks_left = self.lazy_table_size_requests
                    self._lazy_timer = self._loop.call_later(
                        self.lazy_table_size_max_delay, self._apply_table_size)
                self._pending_table_size = new_size
                held = not self.ack_settings_early
            else:
                self._encoder.header_table_size = new_size
        if held or self._deferred_acks:
            self._deferred_acks += 1  # ACKs stay in order
        else:
            self._send_settings_acks(1)
        self._notifier.notify()

    def _on_ping(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ProtocolError(PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ProtocolError(FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
        if flags & FLAG_ACK:
            if payload == BDP_PING_DATA and self.dynamic_window:
                self._bdp_calculate()
            return
        self.pings_answered += 1
        self._write([encode_frame(PING, FLAG_ACK, 0, payload)])

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ProtocolError(FRAME_SIZE_ERROR, "GOAWAY payload too short")
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        code = int.from_bytes(payload[4:8], "big")
        self.goaway = (last, code, bytes(payload[8:]))
        for s, call in list(self._streams.items()):
            if s > last:
                call._unprocessed = True
                self._finish(call, RpcError(UNAVAILABLE, "the stream is rejected because "
                                            f"server is draining the connection (GOAWAY code "
                                            f"{code})"))
        self._notifier.notify()
        if not self._streams and self._closed is None:
            self._fail_connection(RpcError(UNAVAILABLE, "transport is closing (GOAWAY)"))

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload must be 4 bytes")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise _ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE with 0 increment")
            self._conn_send_window += inc
            if self._conn_send_window > MAX_WINDOW:
                raise _ProtocolError(FLOW_CONTROL_ERROR, "connection send window overflow")
        else:
            call = self._streams.get(sid)
            if call is None:
                return
            if inc == 0:
                self._stream_error(call, PROTOCOL_ERROR,
                                   RpcError(INTERNAL, "WINDOW_UPDATE with 0 increment"))
                return
            call._send_window += inc
            if call._send_window > MAX_WINDOW:
                self._stream_error(call, FLOW_CONTROL_ERROR,
                                   RpcError(INTERNAL, "stream send window overflow"))
                return
        self._notifier.notify()

    # ================= failure =================
    def _settings_timed_out(self) -> None:
        if not self._settings_seen and self._closed is None:
            self._fail_connection(RpcError(
                UNAVAILABLE, "connection error: timed out waiting for the server's SETTINGS"))

    def _fail_connection(self, error: RpcError) -> None:
        if self._closed is not None:
            return
        self._closed = error
        self._settings_timer.cancel()
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
        for call in list(self._streams.values()):
            # local close() reports at once; transport loss after buffered messages
            self._finish(call, RpcError(error.code, error.details),
                         immediate=error.code == CANCELLED)
        self._notifier.notify()
        with contextlib.suppress(Exception):
            self._writer.close()
