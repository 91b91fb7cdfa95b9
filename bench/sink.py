"""A lean BuildKit-like HTTP/2 sink for the upload benchmark (frame level, asyncio Protocol).

It stands in for buildkitd at the receiving end of a Session-tunnel upload and is cheap enough
not to be the bottleneck: DATA payloads on Session streams are never copied, only counted (the
gRPC message prefixes inside them are tracked so message counts can be checked), and a DATA
frame that straddles two reads is not buffered, only its remaining length is remembered.

Flow control emulates grpc-go's server with BDP estimation, as buildkitd behaves on loopback:
SETTINGS_INITIAL_WINDOW_SIZE 65535 at first, then raised by further SETTINGS in steps as data
arrives (64K -> 120K -> 164K -> ... -> 682K), the connection window raised by WINDOW_UPDATE by
the same difference (a PING is sent with each raise, as the BDP estimator does); credit is
returned as data is consumed, per stream and per connection, once a quarter of the window is
unacknowledged (grpc-go's inFlow threshold).

Served paths:
- /moby.buildkit.v1.Control/Session (bidi): response headers at once plus one small message
  (the inner connection's preface, as the daemon would send); reads and counts all DATA; after
  the client's END_STREAM sends trailers grpc-status 0 with x-bench-* counters (bytes, messages,
  frames received on that stream; with TLS, x-bench-tls: the connection's version, cipher, ALPN).
- /moby.buildkit.v1.Control/Solve (unary): decodes SolveRequest (Ref 1, Session 5) and replies
  (empty message, grpc-status 0) once the Session with that id has finished (at once if it has).
- any other path: after the request's END_STREAM, a valid gRPC reply: headers, one message,
  trailers grpc-status 0. The message is empty except where an empty one would mislead a prober:
  Health/Check says SERVING, ListWorkers lists one linux/amd64 worker, Info carries a version,
  and ListenBuildHistory sends no event (an empty event would read as one active build).
  Subscriptions (Health/Watch, ListenBuildHistory without EarlyExit) stay open until cancelled.

With --work-dir DIR the sink also does buildkitd's per-message work on Session streams (`Work`):
each whole message is copied out, sha256-hashed and written to a file in DIR.

Downloads (`upload.py --direction download`): a Session whose request carries
`x-bench-download: NAME` asks for the file NAME given with `--serve FILE` (gRPC-framed
BytesMessages, indexed and hashed when the sink starts). The Session gets its response headers at
once but no tunnel preface; once the Solve naming the session has arrived (before or after the
Session), the sink streams the file's messages on the Session stream (`SinkConn._pump`: grpc-go
loopy-writer rules, frames of at most 16384 bytes, never spanning two messages, cut to the
client's stream and connection windows), then answers the Solve. After the client's END_STREAM
the Session's trailers carry x-bench-bytes/-messages/-frames sent and x-bench-sha256 of the
file's messages. Lean: the file is sent from memory; with --work-dir each message is read from the
file with one pread() (tmpfs), as buildkitd's exporter reads the result's files.

With --tls-cert FILE --tls-key FILE the sink serves TLS (Python's ssl under uvloop, as the
gateway's listener does; TLS 1.2 or later; ALPN `h2` selected when offered, as buildkitd, a client
offering none accepted): the replica end of `upload.py --tls`.

Run standalone: `python bench/sink.py [--port 0] [--work-dir DIR] [--serve FILE ...]
[--tls-cert FILE --tls-key FILE]`;
prints `SINK READY <port>` on stdout.
Any HPACK input is accepted (one hpack.Decoder per connection); PING is answered.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import ssl
import struct
import sys
from typing import Any

from hpack import Decoder, Encoder

# Frame types and flags (RFC 9113).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONT = (
    range(10)
)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

S_HEADER_TABLE_SIZE = 0x1
S_ENABLE_PUSH = 0x2
S_MAX_CONCURRENT_STREAMS = 0x3
S_INITIAL_WINDOW_SIZE = 0x4
S_MAX_FRAME_SIZE = 0x5
S_MAX_HEADER_LIST_SIZE = 0x6

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HDR = struct.Struct(">HBBBI")  # length hi16, length lo8, type, flags, stream id
U32 = struct.Struct(">I")

SESSION_PATH = "/moby.buildkit.v1.Control/Session"
SOLVE_PATH = "/moby.buildkit.v1.Control/Solve"

# grpc-go BDP estimation on loopback against buildkitd: the stream/connection window steps.
WINDOW_STEPS = (65535, 122880, 167936, 229376, 311296, 421888, 524288, 698368)
DEFAULT_WINDOW = 65535


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME_HDR.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def settings_frame(pairs: list[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def window_update(sid: int, inc: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, U32.pack(inc))


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + U32.pack(len(body)) + body


def pb_bytes(field: int, value: bytes) -> bytes:
    """Protobuf length-delimited field (wire type 2)."""
    return _varint((field << 3) | 2) + _varint(len(value)) + value


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_fields(buf: bytes) -> dict[int, list[bytes | int]]:
    """Decode the top-level fields of a protobuf message (varint and length-delimited)."""
    out: dict[int, list[bytes | int]] = {}
    i, n = 0, len(buf)
    while i < n:
        key, i = _read_varint(buf, i)
        field, wt = key >> 3, key & 7
        val: bytes | int
        if wt == 0:
            val, i = _read_varint(buf, i)
        elif wt == 2:
            ln, i = _read_varint(buf, i)
            val, i = bytes(buf[i : i + ln]), i + ln
        elif wt == 1:
            val, i = int.from_bytes(buf[i : i + 8], "little"), i + 8
        elif wt == 5:
            val, i = int.from_bytes(buf[i : i + 4], "little"), i + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        out.setdefault(field, []).append(val)
    return out


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = res = 0
    while True:
        b = buf[i]
        i += 1
        res |= (b & 0x7F) << shift
        if not b & 0x80:
            return res, i
        shift += 7


def apply_settings(conn: Any, payload: bytes | bytearray) -> None:
    """A peer's SETTINGS, for the sink and the benchmark's client alike: a new initial window
    changes the send window of every open stream (`conn.streams[...].send_win`); the frame size
    and HPACK table size bound what is sent."""
    for i in range(0, len(payload) - 5, 6):
        key, val = struct.unpack_from(">HI", payload, i)
        if key == S_INITIAL_WINDOW_SIZE:
            delta = val - conn.peer_init_win
            conn.peer_init_win = val
            for st in conn.streams.values():
                st.send_win += delta
        elif key == S_MAX_FRAME_SIZE:
            conn.peer_max_frame = val
        elif key == S_HEADER_TABLE_SIZE:
            conn.enc.header_table_size = min(val, 4096)


def _canned_reply(path: str) -> bytes | None:
    """The message body answered on non-Session, non-Solve paths (None: no message)."""
    if path == "/grpc.health.v1.Health/Check" or path == "/grpc.health.v1.Health/Watch":
        return b"\x08\x01"  # status: SERVING
    if path == "/moby.buildkit.v1.Control/ListWorkers":
        platform = pb_bytes(1, b"amd64") + pb_bytes(2, b"linux")
        record = pb_bytes(1, b"bench-sink-worker") + pb_bytes(3, platform)
        return pb_bytes(1, record)
    if path == "/moby.buildkit.v1.Control/Info":
        version = pb_bytes(1, b"github.com/moby/buildkit") + pb_bytes(2, b"v0.0.0-bench-sink")
        return pb_bytes(1, version)
    if path == "/moby.buildkit.v1.Control/ListenBuildHistory":
        return None  # zero events: no active builds
    return b""


def _stays_open(path: str, request: bytes) -> bool:
    """Subscriptions stay open, as on buildkitd, so a prober does not spin re-subscribing:
    Health/Watch, and ListenBuildHistory without EarlyExit (field 3)."""
    if path == "/grpc.health.v1.Health/Watch":
        return True
    if path != "/moby.buildkit.v1.Control/ListenBuildHistory":
        return False
    try:
        fields = pb_fields(request[5:]) if len(request) >= 5 else {}
    except (ValueError, IndexError):
        return False
    return not fields.get(3, [0])[0]


def take_messages(st: Any, data: bytes, start: int, end: int, work: Any, key: Any) -> None:
    """The gRPC message boundaries in a stream's DATA data[start:end], tracked without copying
    it (`st` carries `msg_left`, `pfx`, `msgs` and `body`). With `work` (work ends), each
    whole message is copied out once and handed to `work.message(key, body)`: the sink's
    `Work` and the download client's `OutputWork`."""
    while start < end:
        if st.msg_left:
            k = min(st.msg_left, end - start)
            st.msg_left -= k
            if work is not None:
                st.body += memoryview(data)[start : start + k]
                if not st.msg_left:
                    work.message(key, st.body)
                    st.body = bytearray()
            start += k
        else:
            take = min(5 - len(st.pfx), end - start)
            st.pfx += data[start : start + take]
            start += take
            if len(st.pfx) == 5:
                st.msgs += 1
                st.msg_left = U32.unpack_from(st.pfx, 1)[0]
                st.pfx.clear()
                if not st.msg_left and work is not None:
                    work.message(key, st.body)


Place = tuple[int, int, "memoryview | None", int]
"""A sender's place in its messages: (offset, index of the current message, the current
message as read from the file or None, the offset that message starts at)."""


def send_messages(conn: Any, *, sid: int, view: memoryview | None, fd: int | None,
                  ends: list[int], total: int, place: Place, swin: int, cwin: int,
                  last: bytes = b"") -> tuple[Place, int, int, int, bool]:
    """Writes as many DATA frames of a stream of gRPC messages as the windows allow, by grpc-go's
    loopy-writer rules: frames of at most 16384 bytes (or the peer's smaller limit), never
    spanning two messages, cut to the window left; used by the upload client and by the sink
    for downloads. The messages come from `view` (lean ends) or, one pread() per message, from
    `fd` (work ends); `ends` are their end offsets, `total` the last. Writes in batches of
    256 KiB to `conn.t`, stopping once `conn.paused`; `last` goes in the same write as the
    last message's frames (the upload's CloseSend). Returns the new place, the stream's and
    the connection's windows left, the frames written, and whether it stopped for window."""
    off, idx, cur, cur_start = place
    maxf = min(16384, conn.peer_max_frame)
    pack = FRAME_HDR.pack
    write = conn.t.writelines
    parts: list[bytes | memoryview] = []
    batch = frames = 0
    stalled = False
    while off < total:
        win = swin if swin < cwin else cwin
        if win <= 0:
            stalled = True
            break
        end = ends[idx]
        n = end - off
        if n > maxf:
            n = maxf
        if n > win:
            n = win
        parts.append(pack(n >> 8, n & 0xFF, DATA, 0, sid))
        if fd is None:
            assert view is not None
            parts.append(view[off : off + n])
        else:
            if cur is None or off >= cur_start + len(cur):
                cur_start = off
                cur = memoryview(os.pread(fd, end - off, off))
            parts.append(cur[off - cur_start : off - cur_start + n])
        off += n
        swin -= n
        cwin -= n
        frames += 1
        if off == end:
            idx += 1
        batch += n
        if batch >= 262144:
            write(parts)
            parts = []
            batch = 0
            if conn.paused:
                break
    if off >= total and last:
        parts.append(last)
    if parts:
        write(parts)
    return (off, idx, cur, cur_start), swin, cwin, frames, stalled


class Work:
    """What buildkitd does with each received message's bytes, done for real (``--work-dir``).

    buildkitd's receiving end of a context upload (session/filesync recvDiffCopy ->
    fsutil.Receive) hashes file contents for the cache key (ContentHasher, sha256) and writes
    them to disk. Here each whole gRPC message is copied out of the read buffers (grpc-go
    assembles every message in its own buffer), sha256-hashed (one hash per Session stream, sent
    back in its trailers as x-bench-sha256 so the client can check every byte), and written to a
    file in a temp dir. The daemon's protocol work inside the tunnel (a second HTTP/2 + gRPC
    layer, two protobuf decodes) is not emulated, so these ends are still cheaper than buildkitd.
    """

    def __init__(self, directory: str) -> None:
        self.fd = os.open(os.path.join(directory, "received.bin"), os.O_WRONLY | os.O_CREAT, 0o600)

    def message(self, st: Stream, body: bytearray) -> None:
        if st.sha is None:
            st.sha = hashlib.sha256()
        st.sha.update(body)
        view = memoryview(body)
        while view:
            view = view[os.write(self.fd, view) :]

    def session_end(self) -> None:
        """After each upload (one at a time): the file only ever holds the current one."""
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)


class ServedFile:
    """A file of gRPC-framed BytesMessages that the sink streams back on a download Session
    (`--serve FILE`, named by the client's `x-bench-download` header): indexed and hashed at
    startup, outside any timing. Lean ends send it from memory; work ends (`--work-dir`) read
    each message from the file with one pread(), as buildkitd's exporter reads the result."""

    def __init__(self, path: str, in_memory: bool) -> None:
        self.name = os.path.basename(path)
        with open(path, "rb") as f:
            blob = f.read()
        view = memoryview(blob)
        h = hashlib.sha256()
        ends: list[int] = []
        pos = 0
        while pos + 5 <= len(blob):
            end = pos + 5 + U32.unpack_from(blob, pos + 1)[0]
            h.update(view[pos + 5 : end])
            ends.append(end)
            pos = end
        if pos != len(blob):
            raise ValueError(f"{path}: not a sequence of gRPC messages")
        self.msg_ends = ends
        self.size = len(blob)
        self.sha256 = h.hexdigest()  # of the message bodies, as the work client hashes them
        self.view: memoryview | None = view if in_memory else None
        self.fd: int | None = None if in_memory else os.open(path, os.O_RDONLY)


class Download:
    """One download in progress on a Session stream: the sender's place in the file."""

    __slots__ = ("done", "file", "frames", "place", "solves", "st", "trailers_due")

    def __init__(self, file: ServedFile, st: Stream) -> None:
        self.file = file
        self.st = st
        self.place: Place = (0, 0, None, 0)  # where the sender is (send_messages)
        self.frames = 0
        self.done = False
        self.trailers_due = False  # the client half-closed before the last byte went out
        self.solves: list[tuple[SinkConn, int]] = []  # answered when the last byte is out


class SinkServer:
    """Server-wide state: finished sessions (id -> counters) and Solves waiting for them."""

    def __init__(
        self,
        *,
        steps: tuple[int, ...] = WINDOW_STEPS,
        verbose: bool = False,
        work: Work | None = None,
    ) -> None:
        self.steps = steps
        self.verbose = verbose
        self.work = work
        self.finished: dict[str, tuple[int, int, int]] = {}
        self.waiting: dict[str, list[tuple[SinkConn, int]]] = {}
        self.conns = 0
        self.served: dict[str, ServedFile] = {}  # --serve: what download Sessions can ask for
        self.download_sessions: dict[str, tuple[SinkConn, Stream]] = {}  # waiting for a Solve

    def session_done(self, sid_str: str, stats: tuple[int, int, int]) -> None:
        self.finished[sid_str] = stats
        if len(self.finished) > 10000:  # bounded memory over long runs
            for k in list(self.finished)[:5000]:
                del self.finished[k]
        for conn, stream_id in self.waiting.pop(sid_str, []):
            conn.reply_solve(stream_id)


class Stream:
    __slots__ = (
        "body",
        "cont",
        "data",
        "download",
        "end_remote",
        "frames",
        "hblock",
        "headers_done",
        "id",
        "is_session",
        "msg_left",
        "msgs",
        "nbytes",
        "path",
        "pfx",
        "recv_unacked",
        "send_win",
        "session_id",
        "sha",
    )

    def __init__(self, sid: int, send_win: int) -> None:
        self.id = sid
        self.path = ""
        self.is_session = False
        self.sha: hashlib._Hash | None = None  # with --work-dir: sha256 of the messages
        self.download: Download | None = None  # a download Session (x-bench-download)
        self.session_id = ""
        self.data = bytearray()
        self.body = bytearray()
        self.end_remote = False
        self.headers_done = False
        self.hblock = bytearray()
        self.cont = False
        self.nbytes = 0
        self.msgs = 0
        self.frames = 0
        self.msg_left = 0
        self.pfx = bytearray()
        self.recv_unacked = 0
        self.send_win = send_win


class FrameReader(asyncio.Protocol):
    """The receiving half shared by the sink and the benchmark's download client: frame parsing
    that never copies DATA payloads (a DATA frame straddling two reads is not buffered, only its
    remaining length is remembered), and grpc-go's receive flow control with BDP estimation.

    Subclasses provide `streams` (objects with `frames`, `end_remote`, `recv_unacked`),
    `_data_payload(st, data, start, end)`, `_frame(ftype, flags, sid, payload)` for every other
    frame, and `_end_remote(st)`; control frames to send go to `out`.
    """

    streams: dict[int, Any]

    def _init_reader(self, steps: tuple[int, ...], preface: bool) -> None:
        self.steps = steps
        self.buf = bytearray()  # an incomplete non-DATA frame (or padded DATA frame)
        self.preface_left = len(PREFACE) if preface else 0
        self.data_left = 0  # bytes of a straddling DATA frame's payload still to come
        self.data_stream: Any = None
        self.out: list[bytes] = []
        # receive side (grpc-go BDP emulation)
        self.step = 0
        self.recv_limit = steps[0]  # current stream and connection limit
        self.conn_unacked = 0
        self.total = 0
        self.next_raise = 2 * steps[0]
        self.ping_seq = 0

    def _data_payload(self, st: Any, data: bytes, start: int, end: int) -> None:
        raise NotImplementedError

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray) -> None:
        raise NotImplementedError

    def _end_remote(self, st: Any) -> None:
        raise NotImplementedError

    def _feed(self, data: bytes) -> None:
        n = len(data)
        pos = 0
        if self.preface_left:
            k = min(self.preface_left, n)
            start = len(PREFACE) - self.preface_left
            if data[:k] != PREFACE[start : start + k]:
                raise ValueError("bad connection preface")
            self.preface_left -= k
            pos = k
        if self.data_left:
            k = min(self.data_left, n - pos)
            st = self.data_stream
            if st is not None:
                self._data_payload(st, data, pos, pos + k)
            self.data_left -= k
            pos += k
            if self.data_left == 0 and st is not None and st.end_remote:
                self._end_remote(st)
            if pos == n:
                return
        if self.buf:
            # complete only the frame that straddles two reads
            need = 9 - len(self.buf)
            if need > 0:
                take = min(need, n - pos)
                self.buf += data[pos : pos + take]
                pos += take
                if len(self.buf) < 9:
                    return
            b = self.buf
            flen = (b[0] << 16) | (b[1] << 8) | b[2]
            ftype = b[3]
            if ftype == DATA and not b[4] & PADDED and len(b) == 9:
                self.buf = bytearray()
                pos = self._data_frame(
                    b[4], U32.unpack_from(b, 5)[0] & 0x7FFFFFFF, flen, data, pos, n
                )
            else:
                take = min(9 + flen - len(b), n - pos)
                b += data[pos : pos + take]
                pos += take
                if len(b) < 9 + flen:
                    return
                self.buf = bytearray()
                self._frame(ftype, b[4], U32.unpack_from(b, 5)[0] & 0x7FFFFFFF, bytes(b[9:]))
        while pos < n:
            if n - pos < 9:
                self.buf = bytearray(data[pos:])
                return
            flen = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
            ftype = data[pos + 3]
            flags = data[pos + 4]
            sid = U32.unpack_from(data, pos + 5)[0] & 0x7FFFFFFF
            if ftype == DATA and not flags & PADDED:
                pos = self._data_frame(flags, sid, flen, data, pos + 9, n)
                continue
            end = pos + 9 + flen
            if end > n:
                self.buf = bytearray(data[pos:])
                return
            self._frame(ftype, flags, sid, data[pos + 9 : end])
            pos = end

    def _data_frame(self, flags: int, sid: int, flen: int, data: bytes, pos: int, n: int) -> int:
        """An unpadded DATA frame whose payload starts at data[pos]; may run past this read."""
        st = self._recv_credit(sid, flen)
        avail = min(flen, n - pos)
        if st is not None:
            if flen:
                st.frames += 1
            if flags & END_STREAM:
                st.end_remote = True
            if avail:
                self._data_payload(st, data, pos, pos + avail)
        if avail < flen:
            self.data_left = flen - avail
            self.data_stream = st
            return n
        if st is not None and flags & END_STREAM:
            self._end_remote(st)
        return pos + flen

    def _recv_credit(self, sid: int, flen: int) -> Any:
        """Flow-control accounting for a DATA frame (grpc-go inFlow + BDP emulation)."""
        self.conn_unacked += flen
        self.total += flen
        out = self.out
        limit = self.recv_limit
        if self.conn_unacked >= limit >> 2:
            out.append(window_update(0, self.conn_unacked))
            self.conn_unacked = 0
        st = self.streams.get(sid)
        if st is not None and not st.end_remote:
            st.recv_unacked += flen
            if st.recv_unacked >= limit >> 2:
                out.append(window_update(sid, st.recv_unacked))
                st.recv_unacked = 0
        if self.total >= self.next_raise and self.step + 1 < len(self.steps):
            self.step += 1
            new = self.steps[self.step]
            self.ping_seq += 1
            out.append(frame(PING, 0, 0, struct.pack(">Q", self.ping_seq)))
            out.append(window_update(0, new - limit))
            out.append(settings_frame([(S_INITIAL_WINDOW_SIZE, new)]))
            self.recv_limit = new
            self.next_raise = self.total + 2 * new
        return st


class SinkConn(FrameReader):
    def __init__(self, server: SinkServer) -> None:
        self.server = server
        self.t: asyncio.Transport | None = None
        self._init_reader(server.steps, preface=True)
        self.streams: dict[int, Stream] = {}
        self.dec = Decoder()
        self.dec.max_header_list_size = 64 << 20
        self.enc = Encoder()
        self.peer_max_frame = 16384
        self.peer_init_win = DEFAULT_WINDOW
        self.conn_send_win = DEFAULT_WINDOW
        self.pending: list[tuple[int, bytes, bool, list[tuple[str, str]] | None]] = []
        self.last_sid = 0
        self.downloads: list[Download] = []  # started (their Solve arrived), not yet all sent
        self.paused = False
        self.tls = ""  # with TLS: "TLSv1.3 TLS_AES_256_GCM_SHA384 h2" (ALPN "-" if none)

    # --- transport callbacks -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.t.set_write_buffer_limits(high=1 << 20)  # as the benchmark's client
        self.server.conns += 1
        obj = transport.get_extra_info("ssl_object")
        if obj is not None:
            cipher = obj.cipher()
            alpn = obj.selected_alpn_protocol() or "-"
            self.tls = f"{obj.version()} {cipher[0] if cipher else '?'} {alpn}"
        self.t.write(
            settings_frame(
                [
                    (S_MAX_FRAME_SIZE, 16384),
                    (S_INITIAL_WINDOW_SIZE, self.steps[0]),
                    (S_MAX_HEADER_LIST_SIZE, 16 << 20),
                ]
            )
        )
        if self.steps[0] > DEFAULT_WINDOW:  # the connection window always starts at 65535
            self.t.write(window_update(0, self.steps[0] - DEFAULT_WINDOW))

    def connection_lost(self, exc: Exception | None) -> None:
        self.t = None
        self.downloads.clear()
        for waiters in self.server.waiting.values():
            waiters[:] = [w for w in waiters if w[0] is not self]
        sessions = self.server.download_sessions
        for key in [k for k, (conn, _) in sessions.items() if conn is self]:
            del sessions[key]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump_downloads()

    def data_received(self, data: bytes) -> None:
        try:
            self._feed(data)
        except Exception as e:  # a broken peer: say so and close, never hang
            print(f"sink: connection error: {e!r}", file=sys.stderr, flush=True)
            self.out.append(frame(GOAWAY, 0, 0, U32.pack(self.last_sid) + U32.pack(1)))
            self._flush()
            if self.t:
                self.t.close()
            return
        self._flush()
        if self.downloads:  # WINDOW_UPDATE or SETTINGS may have opened the windows
            self._pump_downloads()

    def _flush(self) -> None:
        if self.out and self.t is not None:
            self.t.write(b"".join(self.out))
        self.out.clear()

    # --- parsing ------------------------------------------------------------------------
    def _data_payload(self, st: Stream, data: bytes, start: int, end: int) -> None:
        st.nbytes += end - start
        if not st.is_session:
            st.data += data[start:end]
            return
        take_messages(st, data, start, end, self.server.work, st)

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray) -> None:
        if ftype == HEADERS or ftype == CONT:
            self._headers(ftype, flags, sid, payload)
        elif ftype == DATA:  # padded DATA (rare): strip padding
            st = self._recv_credit(sid, len(payload))
            body = payload
            if flags & PADDED:
                pad = payload[0]
                body = payload[1 : len(payload) - pad]
            if st is not None:
                st.frames += 1 if body else 0
                self._data_payload(st, bytes(body), 0, len(body))
                if flags & END_STREAM:
                    st.end_remote = True
                    self._end_remote(st)
        elif ftype == SETTINGS:
            if flags & ACK:
                return
            apply_settings(self, payload)
            self.out.append(frame(SETTINGS, ACK, 0))
            self._send_pending()
        elif ftype == PING:
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, bytes(payload)))
        elif ftype == WINDOW_UPDATE:
            inc = U32.unpack_from(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.conn_send_win += inc
            elif sid in self.streams:
                self.streams[sid].send_win += inc
            self._send_pending()
        elif ftype == RST_STREAM:
            st = self.streams.pop(sid, None)
            if st is not None and st.download is not None:
                self.downloads = [d for d in self.downloads if d.st is not st]
                self.server.download_sessions.pop(st.session_id, None)
            if st is not None and st.is_session and not st.end_remote:
                st.end_remote = True
                self._session_finished(st)
            self.pending = [p for p in self.pending if p[0] != sid]
        elif ftype == GOAWAY:
            pass  # the peer drains; our replies still go out
        # PRIORITY, PUSH_PROMISE and unknown types are ignored

    def _headers(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray) -> None:
        if ftype == HEADERS:
            off, end = 0, len(payload)
            if flags & PADDED:
                off = 1
                end -= payload[0]
            if flags & PRIORITY_FLAG:
                off += 5
            st = self.streams.get(sid)
            if st is None:
                st = Stream(sid, self.peer_init_win)
                self.streams[sid] = st
                self.last_sid = max(self.last_sid, sid)
            st.hblock = bytearray(payload[off:end])
            if flags & END_STREAM:
                st.end_remote = True
        else:
            st = self.streams.get(sid)
            if st is None:
                # CONTINUATION of a stream we no longer track: decode to keep HPACK in sync
                st = Stream(sid, 0)
                self.streams[sid] = st
            st.hblock += payload
        if not flags & END_HEADERS:
            return
        headers = self.dec.decode(bytes(st.hblock))
        st.hblock = bytearray()
        if st.headers_done:  # trailers
            if st.end_remote:
                self._end_remote(st)
            return
        st.headers_done = True
        hd: dict[str, str] = {}
        for k, v in headers:
            hd.setdefault(k, v)
        st.path = hd.get(":path", "")
        if st.path == SESSION_PATH:
            st.is_session = True
            st.session_id = hd.get("x-docker-expose-session-uuid", "")
            want = hd.get("x-bench-download")
            if want is not None:
                self._download_session(st, want)
            else:
                self._send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                # the daemon's side of the inner h2c connection opens with a few bytes
                self._send_data(
                    sid, grpc_message(pb_bytes(1, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"))
                )
        if st.end_remote:
            self._end_remote(st)

    def _end_remote(self, st: Stream) -> None:
        if st.download is not None:
            self._download_trailers(st.download)
        elif st.is_session:
            trailers = [
                ("grpc-status", "0"),
                ("x-bench-bytes", str(st.nbytes)),
                ("x-bench-messages", str(st.msgs)),
                ("x-bench-frames", str(st.frames)),
            ]
            if st.sha is not None:
                trailers.append(("x-bench-sha256", st.sha.hexdigest()))
            if self.tls:  # what the hop into the sink negotiated (through a proxy: the proxy's)
                trailers.append(("x-bench-tls", self.tls))
            self._send_headers(st.id, trailers, end=True)
            self._session_finished(st)
            if self.server.verbose:
                print(
                    f"sink: session {st.session_id} {st.nbytes} B {st.msgs} msgs "
                    f"{st.frames} frames",
                    file=sys.stderr,
                    flush=True,
                )
        elif st.path == SOLVE_PATH:
            session = ""
            try:
                raw = bytes(st.data)
                if len(raw) >= 5:
                    fields = pb_fields(raw[5 : 5 + U32.unpack_from(raw, 1)[0]])
                    v = fields.get(5, [b""])[0]
                    session = v.decode() if isinstance(v, bytes) else ""
            except Exception as e:
                print(f"sink: bad SolveRequest: {e!r}", file=sys.stderr, flush=True)
            download = self.server.download_sessions.pop(session, None) if session else None
            if download is not None:  # the Session asked for a download: it starts now
                download[0].start_download(download[1], [(self, st.id)])
            elif not session or session in self.server.finished:
                self.reply_solve(st.id)
            else:
                self.server.waiting.setdefault(session, []).append((self, st.id))
        else:
            body = _canned_reply(st.path)
            self._send_headers(st.id, [(":status", "200"), ("content-type", "application/grpc")])
            if body is not None:
                self._send_data(st.id, grpc_message(body))
            if not _stays_open(st.path, bytes(st.data)):
                self._send_headers(st.id, [("grpc-status", "0")], end=True)
        st.data = bytearray()

    def _session_finished(self, st: Stream) -> None:
        self.server.session_done(st.session_id, (st.nbytes, st.msgs, st.frames))
        work = self.server.work
        if work is not None:  # after the replies are flushed: freeing 200 MB takes a while
            asyncio.get_running_loop().call_soon(work.session_end)

    # --- downloads (the exporter's result streamed back to the client on the Session) -------
    def _download_session(self, st: Stream, want: str) -> None:
        """A Session that asks for a download: headers now (no tunnel preface, so the stream
        holds the download's messages only); the data once the Solve naming it arrives."""
        served = self.server.served.get(want)
        if served is None:
            self._send_headers(
                st.id,
                [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "5"),
                 ("grpc-message", f"sink serves no file {want!r} (--serve)")],
                end=True,
            )
            return
        self._send_headers(st.id, [(":status", "200"), ("content-type", "application/grpc")])
        st.download = Download(served, st)
        solves = self.server.waiting.pop(st.session_id, None)
        if solves:  # the Solve came first (the gateway holds a Session until its Solve)
            self.start_download(st, solves)
        else:
            self.server.download_sessions[st.session_id] = (self, st)

    def start_download(self, st: Stream, solves: list[tuple[SinkConn, int]]) -> None:
        download = st.download
        if download is None or st.id not in self.streams or self.t is None:
            for conn, sid in solves:  # the Session is gone: nothing to wait for
                conn.reply_solve(sid)
            return
        download.solves = solves
        self.downloads.append(download)
        self._pump_downloads()

    def _pump_downloads(self) -> None:
        if self.paused or self.t is None:
            return
        self._flush()  # response headers and control frames go before the DATA
        for download in list(self.downloads):
            self._pump(download)
            if self.paused:
                return

    def _pump(self, dl: Download) -> None:
        """Send as many DATA frames of the download as the windows allow (`send_messages`, as
        the benchmark's upload client sends)."""
        st = dl.st
        assert self.t is not None
        if self.streams.get(st.id) is not st:  # reset meanwhile
            self.downloads.remove(dl)
            return
        f = dl.file
        dl.place, st.send_win, self.conn_send_win, frames, _ = send_messages(
            self, sid=st.id, view=f.view, fd=f.fd, ends=f.msg_ends, total=f.size,
            place=dl.place, swin=st.send_win, cwin=self.conn_send_win)
        dl.frames += frames
        if dl.place[0] >= f.size:
            dl.done = True
            dl.place = (*dl.place[:2], None, 0)  # the last message read is no longer needed
            self.downloads.remove(dl)
            for conn, solve_sid in dl.solves:  # the export is done: Solve returns
                conn.reply_solve(solve_sid)
            dl.solves = []
            if dl.trailers_due:
                self._download_trailers(dl)
                self._flush()

    def _download_trailers(self, dl: Download) -> None:
        """After the client's END_STREAM (its CloseSend once it has everything): what was sent,
        and the sha256 of the file's messages, which the work client checks against its own."""
        st = dl.st
        if not dl.done:
            dl.trailers_due = True
            return
        sent, messages = dl.place[:2]
        trailers = [
            ("grpc-status", "0"),
            ("x-bench-bytes", str(sent)),
            ("x-bench-messages", str(messages)),
            ("x-bench-frames", str(dl.frames)),
            ("x-bench-sha256", dl.file.sha256),
        ]
        if self.tls:
            trailers.append(("x-bench-tls", self.tls))
        self._send_headers(st.id, trailers, end=True)
        self.server.session_done(st.session_id, (sent, messages, dl.frames))

    def reply_solve(self, sid: int) -> None:
        if sid not in self.streams:
            return
        self._send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        self._send_data(sid, grpc_message(b""))
        self._send_headers(sid, [("grpc-status", "0")], end=True)
        self._flush()

    # --- sending (small replies only; honours the peer's windows) -------------------------
    def _send_headers(self, sid: int, headers: list[tuple[str, str]], end: bool = False) -> None:
        if any(p[0] == sid for p in self.pending):  # keep order behind queued DATA
            self.pending.append((sid, b"", end, headers))
            return
        self._write_headers(sid, headers, end)

    def _write_headers(self, sid: int, headers: list[tuple[str, str]], end: bool) -> None:
        block = self.enc.encode(headers)
        mf = self.peer_max_frame
        first, rest = block[:mf], block[mf:]
        flags = (END_STREAM if end else 0) | (0 if rest else END_HEADERS)
        self.out.append(frame(HEADERS, flags, sid, first))
        while rest:
            chunk, rest = rest[:mf], rest[mf:]
            self.out.append(frame(CONT, 0 if rest else END_HEADERS, sid, chunk))
        if end:
            st = self.streams.get(sid)
            if st is not None and st.end_remote:
                del self.streams[sid]

    def _send_data(self, sid: int, data: bytes) -> None:
        self.pending.append((sid, data, False, None))
        self._send_pending()

    def _send_pending(self) -> None:
        keep = []
        blocked: set[int] = set()
        for item in self.pending:
            sid, data, end, headers = item
            if sid in blocked:
                keep.append(item)
                continue
            if headers is not None:
                self._write_headers(sid, headers, end)
                continue
            st = self.streams.get(sid)
            win = min(self.conn_send_win, st.send_win if st else 0)
            if len(data) > win or st is None:
                if st is not None:
                    blocked.add(sid)
                    keep.append(item)
                continue
            self.conn_send_win -= len(data)
            st.send_win -= len(data)
            for i in range(0, len(data), self.peer_max_frame):
                self.out.append(frame(DATA, 0, sid, data[i : i + self.peer_max_frame]))
        self.pending = keep


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The sink's server side of TLS: like buildkitd's (Go crypto/tls with NextProtos h2)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


async def serve(
    host: str,
    port: int,
    verbose: bool = False,
    work_dir: str | None = None,
    tls: ssl.SSLContext | None = None,
    serve_files: list[str] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    server = SinkServer(verbose=verbose, work=Work(work_dir) if work_dir else None)
    for path in serve_files or []:
        served = ServedFile(path, in_memory=work_dir is None)
        server.served[served.name] = served
    srv = await loop.create_server(lambda: SinkConn(server), host, port, backlog=128, ssl=tls)
    sock = srv.sockets[0]
    print(f"SINK READY {sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    srv.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument(
        "--work-dir",
        help="do buildkitd's per-message work: copy, sha256 and write each message to a file here",
    )
    ap.add_argument(
        "--serve",
        action="append",
        default=[],
        metavar="FILE",
        help="a file of gRPC-framed messages a download Session may ask for by its base name "
        "(x-bench-download); repeatable. Sent from memory, or with --work-dir read per message",
    )
    ap.add_argument("--tls-cert", help="serve TLS with this PEM certificate (chain)")
    ap.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = ap.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    if sys.platform.startswith("linux"):
        _die_with_parent()
    tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    main_coro = serve(args.host, args.port, args.verbose, args.work_dir, tls, args.serve)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
        return
    uvloop.run(main_coro)


def _die_with_parent() -> None:
    """Exit if the benchmark that started us dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            sys.exit(0)
    except Exception:
        pass


if __name__ == "__main__":
    main()
