"""Session-tunnel upload and download benchmark: direct vs HAProxy `mode tcp` vs buildkit-gateway.

What one upload is (see bench/README.md): a frame-level client that behaves like grpc-go/buildctl
connects, waits for the server's SETTINGS, opens `Control/Session` (session headers) and
`Control/Solve` (SolveRequest{Ref, Session}) on the same connection, streams SIZE MB through the
Session as gRPC BytesMessage messages (~10 KB on average) in DATA frames of at most 16384 bytes,
honouring the server's windows exactly as grpc-go does (one message never shares a frame; a
frame is cut to the window left), half-closes, and waits for the Solve response (the timer stops
there) and the Session trailers. The sink (bench/sink.py, a separate process) emulates
buildkitd's windows (64 KB raised in steps to 682 KB) and reports what it received.

What one download is (--direction download): the same connection, Session (asking for the result
with `x-bench-download`) and Solve, but the sink streams SIZE MB back on the Session stream once
the Solve arrives, as buildkitd's local/tar exporter sends a build's result to buildctl; the
client's receive windows grow as grpc-go's do (BDP), the sink sends as grpc-go's loopy writer.
The Solve returns when the last byte is out; the client then half-closes the Session and the
sink's trailers (counters, sha256) end it: the timer stops there. --direction upload,download
(the default) measures both, each with every kind of ends, on the same processes.

The whole run is done once per kind of ends (--ends lean,work): lean ends only move bytes; work
ends also do buildctl's and buildkitd's I/O per message (upload: the client reads each message
from a file; the sink copies, sha256-hashes and writes it to a file; download: the other way
round), see bench/README.md.

With --tls every leg is the TLS variant, measured against TLS direct in the same run: the sink
serves TLS (ALPN h2), the client offers ALPN h2 as buildctl does and verifies the certificates
(made at run time with trustme); HAProxy `mode tcp` passes the client's TLS through to the sink;
the gateway terminates TLS on its listener (--tlscert/--tlskey) and dials the sink over TLS
(--replica-tlscacert, --replica-servername).

Legs run interleaved, each a few times; the median time gives the ratio direct/path (1.0 means
the proxy costs nothing; higher is better). The proxy's CPU per upload is its on-CPU time (all
threads and descendants, /proc/PID/task/*/schedstat) before and after each upload.

  .venv/bin/python bench/upload.py [--size-mb 200] [--repeats 9] [--legs direct,haproxy,gateway]
      [--gateway-cmd 'CMD ...'] [--haproxy PATH] [--msg-sizes 24000,4000,2500] [--timeout 30]
      [--ready-timeout 15] [--deadline 200] [--ends lean,work] [--direction upload,download]
      [--tls] [--json FILE] [--keep-logs]
"""

# ruff: noqa: ASYNC221, ASYNC240
# (a benchmark driver: blocking process and file calls happen outside the timed uploads)

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpack import Decoder, Encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sink import (
    ACK,
    CONT,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_MAX_HEADER_LIST_SIZE,
    SESSION_PATH,
    SETTINGS,
    SOLVE_PATH,
    U32,
    WINDOW_STEPS,
    WINDOW_UPDATE,
    FrameReader,
    Place,
    apply_settings,
    frame,
    grpc_message,
    pb_bytes,
    send_messages,
    settings_frame,
    take_messages,
    window_update,
)

BENCH_DIR = Path(__file__).resolve().parent
SHARED_KEY = "bench:0011223344556677"
# BytesMessage.data sizes, cycled: mean ~10 KB, and ~1.35 DATA frames per message as measured
# with buildctl against buildkitd (inner h2c writes of up to ~24 KB plus small control writes).
DEFAULT_MSG_SIZES = (24000, 4000, 2500)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# --tls: the names on the certificates (the clients verify them; nothing resolves them)
SINK_TLS_NAME = "sink.bench.test"
GATEWAY_TLS_NAME = "gateway.bench.test"
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def random_id() -> str:
    """25-char base-36 id, like buildkit's identity.NewID()."""
    n = int.from_bytes(secrets.token_bytes(16), "big")
    out = []
    for _ in range(25):
        n, r = divmod(n, 36)
        out.append(_B36[r])
    return "".join(out)


# ----------------------------------------------------------------------------------------
# payload


class Payload:
    """The whole Session stream, pre-built once: concatenated gRPC-framed BytesMessages."""

    def __init__(self, size: int, msg_sizes: tuple[int, ...]) -> None:
        pattern = os.urandom(1 << 20)
        parts: list[bytes] = []
        ends: list[int] = []
        total = 0
        done = 0
        i = 0
        while done < size:
            n = min(msg_sizes[i % len(msg_sizes)], size - done)
            i += 1
            off = (done * 7) % ((1 << 20) - n)
            body = pb_bytes(1, pattern[off : off + n])
            msg = grpc_message(body)
            parts.append(msg)
            total += len(msg)
            ends.append(total)
            done += n
        self.blob = b"".join(parts)
        self.view = memoryview(self.blob)
        self.fd: int | None = None  # set by to_file(): each message is read from the file
        self.sha256: str | None = None
        self.path: Path | None = None  # set by write(): the file a download asks the sink for
        self.msg_ends = ends
        self.data_bytes = size
        self.wire_bytes = total
        self.messages = len(ends)

    def write(self, path: Path) -> None:
        """Write the payload to `path`, which the sink serves for downloads (`--serve`), and
        compute the sha256 of its messages (what the work ends check)."""
        path.write_bytes(self.blob)
        self.path = path
        if self.sha256 is None:
            h = hashlib.sha256()
            start = 0
            for end in self.msg_ends:
                h.update(self.view[start + 5 : end])
                start = end
            self.sha256 = h.hexdigest()

    def to_file(self, path: Path) -> None:
        """Read messages from a file from now on, as buildctl reads the context's files.

        buildctl's sending end (fsutil.Send) reads every file of the context from disk; with
        --ends work each message is read with one pread() from a file holding the payload (page
        cache, as a context that was just written is). The protocol work buildctl adds inside
        the tunnel (a second HTTP/2 + gRPC layer) is not emulated.
        """
        self.write(path)  # also the sha256 the work sink must report
        self.fd = os.open(path, os.O_RDONLY)

    def close_file(self) -> None:
        """Back to sending from memory."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------------
# client


class UploadError(Exception):
    pass


@dataclass
class UploadResult:
    seconds: float
    frames: int  # DATA frames with payload sent on the Session stream
    window_waits: int | None  # times the sender stopped for window (uploads only)
    sink_bytes: int | None
    sink_messages: int | None
    sink_frames: int | None
    wire_bytes: int
    tls: str | None = None  # --tls: version, cipher, ALPN ("TLSv1.3 TLS_AES_256_GCM_SHA384 h2")
    sink_tls: str | None = None  # --tls: the same, of the connection into the sink (x-bench-tls)


class _CallsClient:
    """What the upload and the download client share: one grpc-go-like connection with a
    `Control/Session` (stream 1) and the `Control/Solve` naming it (stream 3), sent at once
    once the server's SETTINGS arrived; the connection's control frames; header blocks
    assembled per stream (objects with `hblock`, `headers`, `trailers`, `end_remote`,
    `send_win`); each call's grpc-status checked when it ends."""

    SESSION_SID = 1
    SOLVE_SID = 3

    streams: dict[int, Any]

    def _init_client(self, authority: str, session_id: str, ref: str, scheme: str) -> None:
        self.scheme = scheme
        self.authority = authority
        self.session_id = session_id
        self.ref = ref
        loop = asyncio.get_running_loop()
        self.t: asyncio.Transport | None = None
        self.settings_seen = loop.create_future()
        self.done = loop.create_future()
        self.dec = Decoder()
        self.dec.max_header_list_size = 64 << 20
        self.enc = Encoder()
        self.peer_init_win = 65535
        self.peer_max_frame = 16384
        self.conn_win = 65535

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.t.write(
            PREFACE + settings_frame([(S_ENABLE_PUSH, 0), (S_MAX_HEADER_LIST_SIZE, 16 << 20)])
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(UploadError(f"connection lost: {exc or 'closed by peer'}"))

    def _fail(self, exc: Exception) -> None:
        for fut in (self.done, self.settings_seen):
            if not fut.done():
                fut.set_exception(exc)
            if not fut.cancelled():
                fut.exception()  # mark retrieved if nobody awaits it

    def _control(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray,
                 out: list[bytes]) -> None:
        """SETTINGS, WINDOW_UPDATE, PING, RST_STREAM (an error) and GOAWAY (an error unless it
        lets both calls finish)."""
        if ftype == SETTINGS:
            if flags & ACK:
                return
            apply_settings(self, payload)
            out.append(frame(SETTINGS, ACK, 0))
            if not self.settings_seen.done():
                self.settings_seen.set_result(None)
        elif ftype == WINDOW_UPDATE:
            inc = U32.unpack_from(payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.conn_win += inc
            elif sid in self.streams:
                self.streams[sid].send_win += inc
        elif ftype == PING:
            if not flags & ACK:
                out.append(frame(PING, ACK, 0, bytes(payload)))
        elif ftype == RST_STREAM:
            code = U32.unpack_from(payload)[0]
            raise UploadError(f"stream {sid} reset by peer (error code {code})")
        elif ftype == GOAWAY:
            last, code = U32.unpack_from(payload)[0] & 0x7FFFFFFF, U32.unpack_from(payload, 4)[0]
            msg = bytes(payload[8:]).decode(errors="replace")
            if code != 0 or last < self.SOLVE_SID:
                raise UploadError(f"GOAWAY last={last} code={code} {msg!r}")

    def _header_frame(self, ftype: int, flags: int, sid: int,
                      payload: bytes | bytearray) -> Any:
        """A HEADERS or CONTINUATION frame: the stream whose block it completed (its headers
        or trailers set), else None. A block with END_STREAM sets `end_remote` once complete."""
        st = self.streams.get(sid)
        if st is None:
            raise UploadError(f"HEADERS on unknown stream {sid}")
        if ftype == HEADERS:
            off, end = 0, len(payload)
            if flags & PADDED:
                off, end = 1, end - payload[0]
            if flags & PRIORITY_FLAG:
                off += 5
            st.hblock = bytearray(payload[off:end])
            if flags & END_STREAM:
                st.end_remote = True  # applied once the block is complete
        else:
            st.hblock += payload
        if not flags & END_HEADERS:
            return None
        hdrs = [(str(k), str(v)) for k, v in self.dec.decode(bytes(st.hblock))]
        st.hblock = bytearray()
        if st.headers is None and not any(k == "grpc-status" for k, _ in hdrs):
            st.headers = hdrs
        else:
            st.trailers = hdrs
        return st

    def _check_status(self, sid: int, st: Any) -> None:
        trailers = dict(st.trailers or st.headers or [])
        status = trailers.get("grpc-status")
        if status != "0":
            raise UploadError(
                f"stream {sid} ({'Session' if sid == 1 else 'Solve'}) ended with grpc-status "
                f"{status} {trailers.get('grpc-message', '')!r}"
            )

    def _open_calls(self, session_extra: list[tuple[str, str]]) -> bytes:
        """The frames that open both calls: the Session's HEADERS (session headers, then
        `session_extra`), the Solve's HEADERS and its request with END_STREAM."""
        common = [
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.66.3"),
            ("te", "trailers"),
        ]
        session_hdrs = [
            (":method", "POST"),
            (":scheme", self.scheme),
            (":path", SESSION_PATH),
            *common,
            ("x-docker-expose-session-uuid", self.session_id),
            ("x-docker-expose-session-sharedkey", SHARED_KEY),
            *session_extra,
        ]
        solve_hdrs = [(":method", "POST"), (":scheme", self.scheme), (":path", SOLVE_PATH), *common]
        solve_req = grpc_message(
            pb_bytes(1, self.ref.encode()) + pb_bytes(5, self.session_id.encode())
        )
        st = self.streams[self.SOLVE_SID]
        if len(solve_req) > min(st.send_win, self.conn_win):
            raise UploadError("no window for the Solve request")
        st.send_win -= len(solve_req)
        self.conn_win -= len(solve_req)
        return (self._headers_frames(self.SESSION_SID, session_hdrs)
                + self._headers_frames(self.SOLVE_SID, solve_hdrs)
                + frame(DATA, END_STREAM, self.SOLVE_SID, solve_req))

    def _headers_frames(self, sid: int, hdrs: list[tuple[str, str]]) -> bytes:
        block = self.enc.encode(hdrs)
        mf = self.peer_max_frame
        parts = [frame(HEADERS, 0 if len(block) > mf else END_HEADERS, sid, block[:mf])]
        rest = block[mf:]
        while rest:
            chunk, rest = rest[:mf], rest[mf:]
            parts.append(frame(CONT, 0 if rest else END_HEADERS, sid, chunk))
        return b"".join(parts)


class _Stream:
    __slots__ = ("end_remote", "ended", "hblock", "headers", "recv_data", "send_win",
                 "trailers")

    def __init__(self, win: int) -> None:
        self.send_win = win
        self.headers: list[tuple[str, str]] | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self.hblock = bytearray()
        self.recv_data = 0
        self.end_remote = False  # END_STREAM seen on a header block
        self.ended = False


class UploadClient(_CallsClient, asyncio.Protocol):
    """One grpc-go-like client connection doing Session + Solve, uploading on the Session."""

    def __init__(
        self, payload: Payload, authority: str, session_id: str, ref: str, scheme: str = "http"
    ) -> None:
        self._init_client(authority, session_id, ref, scheme)
        self.p = payload
        self.solve_done_at: float | None = None
        self.buf = bytearray()
        self.streams = {
            self.SESSION_SID: _Stream(65535),
            self.SOLVE_SID: _Stream(65535),
        }
        self.started = False
        self.paused = False
        # sender state
        self.place: Place = (0, 0, None, 0)  # send_messages's
        self.frames = 0
        self.window_waits = 0
        self.blocked = False
        self.sent_end = False
        self.recv_unacked = 0

    # --- transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.t is not None
        self.t.set_write_buffer_limits(high=1 << 20)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        out: list[bytes] = []
        try:
            while n - pos >= 9:
                flen = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                if n - pos < 9 + flen:
                    break
                ftype = buf[pos + 3]
                flags = buf[pos + 4]
                sid = U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
                payload = bytes(buf[pos + 9 : pos + 9 + flen])
                pos += 9 + flen
                self._frame(ftype, flags, sid, payload, out)
        except UploadError as e:
            self._fail(e)
        except Exception as e:
            self._fail(UploadError(f"client protocol error: {e!r}"))
        del buf[:pos]
        if out and self.t is not None:
            self.t.write(b"".join(out))
        if self.started:
            self._pump()

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes, out: list[bytes]) -> None:
        if ftype == DATA:
            st = self.streams.get(sid)
            if st is not None:
                st.recv_data += len(payload)
            if payload:
                self.recv_unacked += len(payload)
                if self.recv_unacked >= 16384:
                    out.append(window_update(0, self.recv_unacked))
                    if st is not None and not st.ended:
                        out.append(window_update(sid, self.recv_unacked))
                    self.recv_unacked = 0
            if flags & END_STREAM and st is not None:
                self._stream_ended(sid, st)
        elif ftype == HEADERS or ftype == CONT:
            st = self._header_frame(ftype, flags, sid, payload)
            if st is not None and st.end_remote:
                self._stream_ended(sid, st)
        else:
            self._control(ftype, flags, sid, payload, out)

    def _stream_ended(self, sid: int, st: _Stream) -> None:
        st.ended = True
        self._check_status(sid, st)
        if sid == self.SOLVE_SID:
            self.solve_done_at = time.perf_counter()
        if all(s.ended for s in self.streams.values()) and not self.done.done():
            self.done.set_result(None)

    # --- sending
    def start(self) -> None:
        """Both HEADERS at once (Session first), the Solve request, then the upload."""
        assert self.t is not None
        self.t.write(self._open_calls([
            ("x-docker-expose-session-grpc-method", "/moby.filesync.v1.FileSync/DiffCopy"),
            ("x-docker-expose-session-grpc-method", "/moby.filesync.v1.FileSync/TarStream"),
            ("x-docker-expose-session-grpc-method", "/grpc.health.v1.Health/Check"),
        ]))
        self.started = True
        self._pump()

    def _pump(self) -> None:
        """Send as many DATA frames as the windows allow (send_messages), then CloseSend."""
        if self.sent_end or self.paused or self.t is None or self.done.done():
            return
        st = self.streams[self.SESSION_SID]
        p = self.p
        self.place, st.send_win, self.conn_win, frames, stalled = send_messages(
            self, sid=self.SESSION_SID, view=p.view, fd=p.fd, ends=p.msg_ends,
            total=p.wire_bytes, place=self.place, swin=st.send_win, cwin=self.conn_win,
            last=frame(DATA, END_STREAM, self.SESSION_SID))  # CloseSend after the last message
        self.frames += frames
        if frames:
            self.blocked = False
        if stalled and not self.blocked:  # one wait per stop, however many pumps it takes
            self.blocked = True
            self.window_waits += 1
        self.sent_end = self.place[0] >= p.wire_bytes


class OutputWork:
    """What buildctl does with each message of a downloaded result, done for real (work ends).

    buildctl's receiving end of the local/tar exporter (session/filesync -> fsutil.Receive, or
    the tar writer) gets every file's bytes in messages that grpc-go assembled in their own
    buffers, and writes them to disk. Here each whole gRPC message is copied out of the read
    buffers, sha256-hashed (checked against the sink's x-bench-sha256: every byte is compared)
    and written to a file (tmpfs; emptied after each download, outside the timing).
    """

    def __init__(self, directory: Path) -> None:
        self.fd = os.open(directory / "download.bin", os.O_WRONLY | os.O_CREAT, 0o600)

    def message(self, sha: Any, body: bytearray) -> None:
        sha.update(body)
        view = memoryview(body)
        while view:
            view = view[os.write(self.fd, view) :]

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)

    def close(self) -> None:
        os.close(self.fd)


class _DlStream:
    __slots__ = ("body", "end_remote", "ended", "frames", "hblock", "headers", "id", "msg_left",
                 "msgs", "nbytes", "pfx", "recv_unacked", "send_win", "trailers")

    def __init__(self, sid: int, win: int) -> None:
        self.id = sid
        self.send_win = win
        self.headers: list[tuple[str, str]] | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self.hblock = bytearray()
        self.end_remote = False  # END_STREAM seen (credit no longer returned)
        self.ended = False  # the call is over: status checked
        self.frames = 0
        self.nbytes = 0
        self.msgs = 0
        self.msg_left = 0
        self.pfx = bytearray()
        self.body = bytearray()
        self.recv_unacked = 0


class DownloadClient(_CallsClient, FrameReader):
    """One grpc-go-like client connection receiving a build result: Session + Solve, then the
    sink streams the payload back on the Session stream.

    Receiving side as grpc-go's client with BDP estimation (the sink's own receive code:
    window 65535 raised in steps by SETTINGS and WINDOW_UPDATE, credit returned once a quarter
    of the window is unacknowledged). Lean ends only count the bytes and track message
    boundaries; work ends copy, sha256 and write each whole message (`OutputWork`). Once the
    Solve has returned and every byte is in, the client half-closes the Session (CloseSend)
    and the sink sends its trailers: the timer stops there.
    """

    def __init__(
        self,
        payload: Payload,
        authority: str,
        session_id: str,
        ref: str,
        scheme: str = "http",
        work: OutputWork | None = None,
    ) -> None:
        self._init_reader(WINDOW_STEPS, preface=False)
        self._init_client(authority, session_id, ref, scheme)
        assert payload.path is not None, "the payload must be written where the sink serves it"
        self.served_name = payload.path.name
        self.expected = payload.wire_bytes
        self.work = work
        self.sha = hashlib.sha256() if work is not None else None
        self.done_at: float | None = None
        self.streams = {
            self.SESSION_SID: _DlStream(self.SESSION_SID, 65535),
            self.SOLVE_SID: _DlStream(self.SOLVE_SID, 65535),
        }
        self.closed_send = False

    # --- transport callbacks
    def data_received(self, data: bytes) -> None:
        try:
            self._feed(data)
        except UploadError as e:
            self._fail(e)
        except Exception as e:
            self._fail(UploadError(f"client protocol error: {e!r}"))
        if self.out and self.t is not None:
            self.t.write(b"".join(self.out))
        self.out.clear()

    # --- receiving
    def _data_payload(self, st: _DlStream, data: bytes, start: int, end: int) -> None:
        st.nbytes += end - start
        if st.id != self.SESSION_SID:
            return  # the Solve response: an empty message
        take_messages(st, data, start, end, self.work, self.sha)
        if st.nbytes >= self.expected:
            self._close_send()

    def _end_remote(self, st: _DlStream) -> None:
        self._stream_ended(st)

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes | bytearray) -> None:
        if ftype == DATA:  # padded DATA (the fast path takes the others)
            st = self._recv_credit(sid, len(payload))
            if st is not None:
                body = payload[1 : len(payload) - payload[0]] if flags & PADDED else payload
                st.frames += 1 if body else 0
                self._data_payload(st, bytes(body), 0, len(body))
                if flags & END_STREAM:
                    st.end_remote = True
                    self._stream_ended(st)
        elif ftype == HEADERS or ftype == CONT:
            st = self._header_frame(ftype, flags, sid, payload)
            if st is not None and st.end_remote:
                self._stream_ended(st)
        else:
            self._control(ftype, flags, sid, payload, self.out)

    def _stream_ended(self, st: _DlStream) -> None:
        if st.ended:
            return
        st.ended = True
        self._check_status(st.id, st)
        self._close_send()
        if all(s.ended for s in self.streams.values()) and not self.done.done():
            self.done_at = time.perf_counter()
            self.done.set_result(None)

    def _close_send(self) -> None:
        """buildctl closes its Session once the Solve has returned; here also only once every
        byte is in, so that the sink's trailers (the timer's end) come after the last byte."""
        session = self.streams[self.SESSION_SID]
        if (self.closed_send or not self.streams[self.SOLVE_SID].ended
                or session.nbytes < self.expected or session.ended):
            return
        self.closed_send = True
        self.out.append(frame(DATA, END_STREAM, self.SESSION_SID))

    # --- sending
    def start(self) -> None:
        """Both HEADERS at once (Session first, asking for the download), then the Solve
        request."""
        assert self.t is not None
        self.t.write(self._open_calls([
            ("x-docker-expose-session-grpc-method", "/moby.filesync.v1.FileSend/DiffCopy"),
            ("x-docker-expose-session-grpc-method", "/moby.filesync.v1.FileSync/DiffCopy"),
            ("x-docker-expose-session-grpc-method", "/grpc.health.v1.Health/Check"),
            ("x-bench-download", self.served_name),
        ]))


def tls_summary(transport: asyncio.BaseTransport) -> str:
    """What a TLS connection negotiated: "TLSv1.3 TLS_AES_256_GCM_SHA384 h2"; raises unless the
    server selected ALPN h2, which buildctl (grpc-go) requires."""
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        raise UploadError("no TLS on the connection")
    alpn = obj.selected_alpn_protocol()
    if alpn != "h2":
        raise UploadError(f"the server selected ALPN {alpn!r}, not 'h2' (grpc-go refuses that)")
    cipher = obj.cipher()
    return f"{obj.version()} {cipher[0] if cipher else '?'} {alpn}"


async def _run_calls(make: Callable[[str, str, str, str], Any], port: int, *, timeout: float,
                     tls: ssl.SSLContext | None, server_name: str | None,
                     what: str) -> tuple[Any, str | None, float]:
    """Connects a client made by `make(authority, session_id, ref, scheme)` (over TLS with
    `tls`, offering ALPN h2, the certificate checked against `server_name`), waits for the
    server's SETTINGS as grpc-go does, starts it and waits until it is done. Returns the
    client, what TLS negotiated, and the start time: the timer starts before connecting, so
    it includes the TLS handshake."""
    loop = asyncio.get_running_loop()
    session_id, ref = random_id(), random_id()
    scheme = "https" if tls is not None else "http"
    t0 = time.perf_counter()
    transport = None
    negotiated = None
    try:
        async with asyncio.timeout(timeout):
            transport, client = await loop.create_connection(
                lambda: make(f"127.0.0.1:{port}", session_id, ref, scheme),
                "127.0.0.1",
                port,
                ssl=tls,
                server_hostname=server_name if tls is not None else None,
            )
            if tls is not None:
                negotiated = tls_summary(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await client.settings_seen  # grpc-go waits for the server preface
            client.start()
            await client.done
    except TimeoutError:
        raise UploadError(f"{what} did not finish within {timeout:.0f} s") from None
    finally:
        if transport is not None:
            transport.close()
    return client, negotiated, t0


def _number(trailers: dict[str, str], key: str) -> int | None:
    v = trailers.get(key)
    return int(v) if v and v.isdigit() else None


async def upload_once(
    port: int,
    payload: Payload,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> UploadResult:
    """One upload; with `tls`, over TLS (offering ALPN h2, the certificate checked against
    `server_name`). The timer starts before connecting, so it includes the TLS handshake."""
    client, negotiated, t0 = await _run_calls(
        lambda authority, session_id, ref, scheme: UploadClient(
            payload, authority, session_id, ref, scheme),
        port, timeout=timeout, tls=tls, server_name=server_name, what="upload")
    assert client.solve_done_at is not None
    tr = dict(client.streams[UploadClient.SESSION_SID].trailers or [])
    num = functools.partial(_number, tr)
    res = UploadResult(
        seconds=client.solve_done_at - t0,
        frames=client.frames,
        window_waits=client.window_waits,
        sink_bytes=num("x-bench-bytes"),
        sink_messages=num("x-bench-messages"),
        sink_frames=num("x-bench-frames"),
        wire_bytes=payload.wire_bytes,
        tls=negotiated,
        sink_tls=tr.get("x-bench-tls"),
    )
    if res.sink_bytes is not None and res.sink_bytes != payload.wire_bytes:
        raise UploadError(f"sink received {res.sink_bytes} bytes, sent {payload.wire_bytes}")
    if res.sink_messages is not None and res.sink_messages != payload.messages:
        raise UploadError(f"sink counted {res.sink_messages} messages, sent {payload.messages}")
    if tls is not None and not (res.sink_tls or "").endswith(" h2"):
        # the sink serves TLS only; buildkitd (grpc-go) also wants ALPN h2 from whoever dials it
        raise UploadError(f"the connection into the sink negotiated {res.sink_tls!r}, not ALPN h2")
    sha = tr.get("x-bench-sha256")
    if payload.fd is not None and sha != payload.sha256:
        raise UploadError(f"sink's sha256 of the messages is {sha}, sent {payload.sha256}")
    return res


async def download_once(
    port: int,
    payload: Payload,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
    work: OutputWork | None = None,
) -> UploadResult:
    """One download of `payload` (written where the sink serves it, `Payload.write`): the
    timer runs from connect to the last byte and the Session trailers. With `work` (work ends)
    every message is copied, hashed and written, and the hash must match the sink's."""
    try:
        client, negotiated, t0 = await _run_calls(
            lambda authority, session_id, ref, scheme: DownloadClient(
                payload, authority, session_id, ref, scheme, work),
            port, timeout=timeout, tls=tls, server_name=server_name, what="download")
    finally:
        if work is not None:
            work.reset()  # after the timer: the file only ever holds the current download
    assert client.done_at is not None
    session = client.streams[DownloadClient.SESSION_SID]
    tr = dict(session.trailers or [])
    num = functools.partial(_number, tr)
    res = UploadResult(
        seconds=client.done_at - t0,
        frames=session.frames,
        window_waits=None,
        sink_bytes=num("x-bench-bytes"),
        sink_messages=num("x-bench-messages"),
        sink_frames=num("x-bench-frames"),
        wire_bytes=payload.wire_bytes,
        tls=negotiated,
        sink_tls=tr.get("x-bench-tls"),
    )
    if session.nbytes != payload.wire_bytes or session.msgs != payload.messages:
        raise UploadError(
            f"received {session.nbytes} bytes in {session.msgs} messages, expected "
            f"{payload.wire_bytes} in {payload.messages}"
        )
    if res.sink_bytes != payload.wire_bytes or res.sink_messages != payload.messages:
        raise UploadError(
            f"sink sent {res.sink_bytes} bytes in {res.sink_messages} messages, expected "
            f"{payload.wire_bytes} in {payload.messages}"
        )
    if tls is not None and not (res.sink_tls or "").endswith(" h2"):
        raise UploadError(f"the connection into the sink negotiated {res.sink_tls!r}, not ALPN h2")
    if client.sha is not None:
        got, sent = client.sha.hexdigest(), tr.get("x-bench-sha256")
        if got != sent or got != payload.sha256:
            raise UploadError(
                f"sha256 of the messages received is {got}, the sink sent {sent} "
                f"(payload {payload.sha256})"
            )
    return res


async def grpc_unary_ok(
    port: int,
    path: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> str:
    """One unary gRPC call with an empty request; returns grpc-status (or raises)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    class P(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = bytearray()
            self.dec = Decoder()
            self.t: asyncio.Transport | None = None
            self.sent = False

        def connection_made(self, t: asyncio.BaseTransport) -> None:
            self.t = t  # type: ignore[assignment]
            self.t.write(PREFACE + settings_frame([]))

        def connection_lost(self, exc: Exception | None) -> None:
            if not fut.done():
                fut.set_exception(UploadError(f"connection closed ({exc})"))

        def data_received(self, data: bytes) -> None:
            self.buf += data
            assert self.t is not None
            while len(self.buf) >= 9:
                flen = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + flen:
                    return
                ftype, flags = self.buf[3], self.buf[4]
                body = bytes(self.buf[9 : 9 + flen])
                del self.buf[: 9 + flen]
                if ftype == SETTINGS and not flags & ACK:
                    self.t.write(frame(SETTINGS, ACK, 0))
                    if not self.sent:
                        self.sent = True
                        hb = Encoder().encode(
                            [
                                (":method", "POST"),
                                (":scheme", "https" if tls is not None else "http"),
                                (":path", path),
                                (":authority", f"127.0.0.1:{port}"),
                                ("content-type", "application/grpc"),
                                ("te", "trailers"),
                            ]
                        )
                        self.t.write(
                            frame(HEADERS, END_HEADERS, 1, hb)
                            + frame(DATA, END_STREAM, 1, grpc_message(b""))
                        )
                elif ftype == PING and not flags & ACK:
                    self.t.write(frame(PING, ACK, 0, body))
                elif ftype == HEADERS:
                    if flags & PADDED:
                        body = body[1 : len(body) - body[0]]
                    if flags & PRIORITY_FLAG:
                        body = body[5:]
                    hdrs = dict(self.dec.decode(body))
                    if "grpc-status" in hdrs and not fut.done():
                        fut.set_result(str(hdrs["grpc-status"]))
                elif ftype in (RST_STREAM, GOAWAY) and not fut.done():
                    fut.set_exception(UploadError(f"frame type {ftype} from peer"))

    transport = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                P,
                "127.0.0.1",
                port,
                ssl=tls,
                server_hostname=server_name if tls is not None else None,
            )
            return await fut
    except TimeoutError:
        raise UploadError("no answer") from None
    finally:
        if transport is not None:
            transport.close()


# ----------------------------------------------------------------------------------------
# processes


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of pid and its live descendants, from /proc, in seconds, two ways:
    (on-CPU time summed over every thread from /proc/P/task/T/schedstat, ns resolution;
     utime+stime from /proc/P/stat, clock ticks: 10 ms resolution)."""
    ticks = 0
    ns = 0
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/schedstat", "rb") as f:
                    ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            ns = -(1 << 62)  # schedstat unavailable: fall back to ticks
    tick_s = ticks / CLK_TCK
    return (ns / 1e9 if ns >= 0 else tick_s), tick_s


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _running(pid: int) -> bool:
    """Not gone and not a zombie (a reparented child is reaped by init, eventually)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def _child_setup() -> None:
    """In the child: die with the benchmark (PR_SET_PDEATHSIG), keep its process group."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except Exception:
        pass


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, **kw: object) -> None:
        self.name = name
        self.log = log
        self.logf = open(log, "wb")
        self.p = subprocess.Popen(
            argv,
            stdout=kw.pop("stdout", self.logf),
            stderr=self.logf,
            stdin=subprocess.DEVNULL,
            preexec_fn=_child_setup,
            **kw,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s; processes it started go too (a --gateway-cmd may be
        a wrapper such as strace, whose child would otherwise outlive the benchmark)."""
        family = _descendants(self.p.pid) if sys.platform.startswith("linux") else []
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(3)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(3)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            family = [pid for pid in family if os.path.exists(f"/proc/{pid}")]
            for pid in family:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while family and time.monotonic() < deadline:
                family = [pid for pid in family if _running(pid)]
                time.sleep(0.05)
        self.logf.close()

    def tail(self, n: int = 8) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join("    | " + ln for ln in lines[-n:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise UploadError(f"{proc.name} exited with code {proc.p.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise UploadError(
                f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s"
            )
        await asyncio.sleep(0.1)


# ----------------------------------------------------------------------------------------
# legs


@dataclass
class Leg:
    name: str
    port: int = 0
    proc: Proc | None = None
    skipped: str | None = None
    start_skipped: str | None = None  # why the leg could not start (every direction)
    note: str = ""
    runs: list[dict[str, float | int | str | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tls_name: str | None = None  # with --tls: the name the client checks on this leg's certificate


@dataclass
class BenchTls:
    """--tls: a private CA and two server certificates, made at run time (trustme) in `dir`."""

    dir: Path
    ca: Path
    sink_cert: Path  # chain, for SINK_TLS_NAME
    sink_key: Path
    gateway_cert: Path  # chain, for GATEWAY_TLS_NAME
    gateway_key: Path
    client: ssl.SSLContext  # the upload client's: the CA trusted, ALPN h2 offered (as buildctl)

    @classmethod
    def make(cls, directory: Path) -> BenchTls:
        import trustme  # only --tls needs it (a dev dependency)

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="buildkit-gateway bench")
        ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        paths: list[Path] = []
        for name in (SINK_TLS_NAME, GATEWAY_TLS_NAME):
            leaf = ca.issue_cert(name)
            cert, key = directory / f"{name}.pem", directory / f"{name}.key"
            for i, blob in enumerate(leaf.cert_chain_pems):
                blob.write_to_path(str(cert), append=i > 0)
            leaf.private_key_pem.write_to_path(str(key))
            paths += [cert, key]
        # grpc-go's credentials.NewTLS: TLS 1.2 or later, NextProtos h2, the server verified
        client = ssl.create_default_context(cafile=str(directory / "ca.pem"))
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        client.set_alpn_protocols(["h2"])
        return cls(directory, directory / "ca.pem", *paths, client)


def haproxy_config(listen: int, sink: int) -> str:
    return f"""global
    nbthread 1
    maxconn 256
    log stderr format raw local0 emerg

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend bench_in
    bind 127.0.0.1:{listen}
    default_backend bench_sink

backend bench_sink
    server sink 127.0.0.1:{sink}
"""


def gateway_argv(args: argparse.Namespace, leg: str = "gateway") -> list[str] | None:
    if leg == "gateway-base":
        return shlex.split(args.baseline_gateway_cmd)
    if args.gateway_cmd:
        return shlex.split(args.gateway_cmd)
    local = Path(sys.executable).parent / "buildkit-gateway"
    if local.exists():
        return [str(local)]
    found = shutil.which("buildkit-gateway")
    return [found] if found else None


async def start_haproxy(leg: Leg, args: argparse.Namespace, tmp: Path, sink_port: int) -> None:
    exe = (
        args.haproxy
        or shutil.which("haproxy")
        or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
    )
    if exe is None:
        leg.skipped = "haproxy not installed (bench/run installs it with apt-get)"
        return
    leg.port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(haproxy_config(leg.port, sink_port))
    check = subprocess.run([exe, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        leg.skipped = f"haproxy config check failed: {check.stderr.strip() or check.stdout.strip()}"
        return
    ver = subprocess.run([exe, "-v"], capture_output=True, text=True).stdout.splitlines()
    leg.note = ver[0] if ver else exe
    leg.proc = Proc("haproxy", [exe, "-db", "-f", str(cfg)], tmp / "haproxy.log")
    try:
        await wait_port(leg.port, leg.proc, 10)
    except UploadError as e:
        leg.skipped = f"{e}\n{leg.proc.tail()}"


async def start_gateway(
    leg: Leg, args: argparse.Namespace, tmp: Path, sink_port: int, tls: BenchTls | None = None
) -> None:
    argv = gateway_argv(args, leg.name)
    if argv is None:
        leg.skipped = (
            "buildkit-gateway not found next to this python or on PATH "
            "(install it: .venv/bin/pip install -e . ; or pass --gateway-cmd "
            "'.venv/bin/python -m gateway')"
        )
        return
    leg.port = free_port()
    argv = [
        *argv,
        "--listen",
        f"tcp://127.0.0.1:{leg.port}",
        "--replica",
        f"tcp://127.0.0.1:{sink_port}",
    ]
    if tls is not None:  # TLS on the listener, and toward the (TLS) sink
        leg.tls_name = GATEWAY_TLS_NAME
        argv += [
            "--tlscert",
            str(tls.gateway_cert),
            "--tlskey",
            str(tls.gateway_key),
            "--replica-tlscacert",
            str(tls.ca),
            "--replica-servername",
            SINK_TLS_NAME,
        ]
    leg.note = " ".join(shlex.quote(a) for a in argv)
    try:
        # Each gateway's admin server on a free port (two gateways run side by side); an
        # environment variable, which gateways without an admin server ignore.
        env = {**os.environ, "BUILDKIT_GATEWAY_ADMIN_LISTEN": "127.0.0.1:0"}
        leg.proc = Proc("buildkit-gateway", argv, tmp / f"{leg.name}.log", env=env)
    except OSError as e:
        leg.skipped = f"cannot start {argv[0]}: {e}"
        return
    try:
        await wait_port(leg.port, leg.proc, args.ready_timeout)
        # ready = a global call answered OK (the gateway has probed the sink)
        deadline = time.monotonic() + args.ready_timeout
        last = ""
        while time.monotonic() < deadline:
            if not leg.proc.alive():
                raise UploadError(f"buildkit-gateway exited with code {leg.proc.p.returncode}")
            try:
                status = await grpc_unary_ok(
                    leg.port,
                    "/moby.buildkit.v1.Control/ListWorkers",
                    3,
                    tls.client if tls is not None else None,
                    leg.tls_name,
                )
                if status == "0":
                    return
                last = f"ListWorkers grpc-status {status}"
            except (UploadError, OSError) as e:
                last = f"ListWorkers: {e}"
            await asyncio.sleep(0.25)
        # not fatal: the warm-up upload decides
        leg.note += f"  [readiness: {last}; trying the upload anyway]"
    except UploadError as e:
        leg.skipped = f"{e}\n{leg.proc.tail()}"


async def run_upload(
    leg: Leg,
    payload: Payload,
    sink: Proc,
    timeout: float,
    tls: BenchTls | None = None,
    direction: str = "upload",
    output: OutputWork | None = None,
) -> dict[str, float | int | str | None]:
    """One timed upload, or download (`direction`; `output`: the work client's file), with the
    CPU the proxy, the sink and this client used meanwhile."""
    proxy_pid = leg.proc.pid if leg.proc else None
    c0 = cpu_seconds(proxy_pid) if proxy_pid else (0.0, 0.0)
    s0 = cpu_seconds(sink.pid)
    own0 = time.process_time()
    client_tls = tls.client if tls is not None else None
    if direction == "download":
        res = await download_once(leg.port, payload, timeout, client_tls, leg.tls_name, output)
    else:
        res = await upload_once(leg.port, payload, timeout, client_tls, leg.tls_name)
    own1 = time.process_time()
    s1 = cpu_seconds(sink.pid)
    c1 = cpu_seconds(proxy_pid) if proxy_pid else (0.0, 0.0)
    d = asdict(res)
    d["proxy_cpu"] = (c1[0] - c0[0]) if proxy_pid else None
    d["proxy_cpu_utime_stime"] = (c1[1] - c0[1]) if proxy_pid else None
    d["sink_cpu"] = s1[0] - s0[0]
    d["client_cpu"] = own1 - own0
    return d


def paired_ratio(direct: Leg | None, lg: Leg) -> float | None:
    """Median over rounds of (direct time / path time) within the same round: both uploads ran
    seconds apart, so slow drifts of the machine's load cancel out."""
    if direct is None:
        return None
    d = {r["round"]: float(r["seconds"]) for r in direct.runs}
    xs = [d[r["round"]] / float(r["seconds"]) for r in lg.runs if r["round"] in d]
    return statistics.median(xs) if xs else None


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(
    legs: list[Leg], payload: Payload, args: argparse.Namespace, ends: str,
    direction: str = "upload",
) -> dict[str, object]:
    direct = next((lg for lg in legs if lg.name == "direct" and lg.runs), None)
    d_med = median([float(r["seconds"]) for r in direct.runs]) if direct else None
    label = f"{ends} ends, TLS" if args.tls else f"{ends} ends"
    if direction != "upload":  # upload lines stay as they were before downloads existed
        label += f", {direction}"
    base = "TLS direct" if args.tls else "direct"  # what every ratio of this run is against
    print()
    print(
        f"Session {direction} {args.size_mb} MB: {payload.messages} BytesMessages "
        f"(sizes {','.join(map(str, args.msg_sizes))} cycled), {payload.wire_bytes} bytes on the "
        f"stream; median of {args.repeats} interleaved runs per leg; {label}"
    )
    hdr = (
        f"{'leg':<9} {'time s':>7} {'(min-max)':>13} {'direct/path':>11} {'proxy CPU s':>11} "
        f"{'us/frame':>9} {'frames':>7} {'sink frm':>8} {'waits':>6} {'sink CPU':>8} "
        f"{'client CPU':>10}"
    )
    print(hdr)
    print("-" * len(hdr))
    summary: dict[str, object] = {}
    for lg in legs:
        if lg.skipped or not lg.runs:
            why = lg.skipped or ("; ".join(lg.errors[-1:]) or "no successful run")
            print(f"{lg.name:<9} SKIPPED: {why.splitlines()[0]}")
            for extra in why.splitlines()[1:]:
                print(f"{'':<9} {extra}")
            summary[lg.name] = {"skipped": why, "errors": lg.errors}
            continue
        secs = [float(r["seconds"]) for r in lg.runs]
        med = median(secs)
        ratio = (d_med / med) if d_med else None
        pcpu = [float(r["proxy_cpu"]) for r in lg.runs if r["proxy_cpu"] is not None]
        pmed = median(pcpu) if pcpu else None
        frames = median([float(r["frames"]) for r in lg.runs])
        sfr = [float(r["sink_frames"]) for r in lg.runs if r["sink_frames"] is not None]
        per_frame = (pmed / frames * 1e6) if pmed is not None and frames else None
        wl = [float(r["window_waits"]) for r in lg.runs if r["window_waits"] is not None]
        waits = median(wl) if wl else None
        scpu = median([float(r["sink_cpu"]) for r in lg.runs])
        ccpu = median([float(r["client_cpu"]) for r in lg.runs])
        print(
            f"{lg.name:<9} {med:>7.3f} {f'({min(secs):.3f}-{max(secs):.3f})':>13} "
            f"{fmt(ratio, '.2f'):>11} {fmt(pmed, '.2f'):>11} {fmt(per_frame, '.1f'):>9} "
            f"{frames:>7.0f} {fmt(median(sfr) if sfr else None, '.0f'):>8} {fmt(waits, '.0f'):>6} "
            f"{scpu:>8.2f} {ccpu:>10.2f}"
        )
        if lg.errors:
            print(f"{'':<9} ({len(lg.errors)} failed run(s): {lg.errors[-1]})")
        summary[lg.name] = {
            "median_s": med,
            "min_s": min(secs),
            "max_s": max(secs),
            "ratio_direct_over_path": ratio,
            "ratio_paired_median": paired_ratio(direct, lg),
            "proxy_cpu_s": pmed,
            "proxy_cpu_us_per_frame": per_frame,
            "frames": frames,
            "runs": lg.runs,
            "errors": lg.errors,
            "note": lg.note,
            "tls": lg.runs[-1].get("tls"),
            "sink_tls": lg.runs[-1].get("sink_tls"),
        }
    print()
    for lg in legs:
        negotiated = lg.runs[-1].get("tls") if lg.runs else None
        if negotiated:  # the client's connection (to the gateway: its listener) and the sink's
            print(f"{lg.name}: TLS client side {negotiated}, sink side {lg.runs[-1]['sink_tls']}")
        if lg.note:
            print(f"{lg.name}: {lg.note}")
    if direction == "download":
        frames_text = (
            "us/frame = proxy CPU / DATA frames the client received on the Session stream.\n"
            "frames = DATA frames received by the client, sink frm = sent by the sink "
            "(x-bench-frames), waits: uploads only."
        )
    else:
        frames_text = (
            "us/frame = proxy CPU / DATA frames the client sent on the Session stream.\n"
            "frames = DATA frames sent by the client, sink frm = received by the sink, waits = "
            "times the client stopped for flow-control window."
        )
    print(
        "direct/path = median direct time / median time through that path (1.00 = free, "
        "higher is better).\nproxy CPU = on-CPU time of the proxy process, all threads "
        f"(/proc/PID/task/*/schedstat), per {direction}, median; {frames_text}"
    )
    print()
    for name in ("haproxy", "gateway", "gateway-base"):
        sm = summary.get(name)
        if not isinstance(sm, dict):
            continue
        if "skipped" in sm:
            print(f"SUMMARY {name} [{label}]: skipped ({str(sm['skipped']).splitlines()[0]})")
            continue
        print(
            f"SUMMARY {name} [{label}]: direct/path {fmt(sm['ratio_direct_over_path'], '.2f')} "
            f"(per-round median {fmt(sm['ratio_paired_median'], '.2f')}), "
            f"{sm['median_s']:.3f} s ({base} {fmt(d_med, '.3f')} s), proxy CPU "
            f"{fmt(sm['proxy_cpu_s'], '.3f')} s per {direction}, "
            f"{fmt(sm['proxy_cpu_us_per_frame'], '.1f')} us per DATA frame"
        )
    cur, old = summary.get("gateway"), summary.get("gateway-base")
    if isinstance(cur, dict) and isinstance(old, dict) and "skipped" not in cur and (
            "skipped" not in old):
        r_cur, r_base = cur["ratio_paired_median"], old["ratio_paired_median"]
        if isinstance(r_cur, float) and isinstance(r_base, float) and r_base:
            print(f"SUMMARY gateway vs gateway-base [{label}]: per-round ratio {r_cur:.2f} vs "
                  f"{r_base:.2f} ({(r_cur / r_base - 1) * 100:+.1f}%)")
    return summary


ENDS = {
    "lean": "client and sink only move bytes: a proxy's cost shows almost in full",
    "work": "client and sink also do buildctl's and buildkitd's I/O per message "
    "(read a file; copy, sha256 and write a file)",
}
DIRECTIONS = {
    "upload": "a build context, client -> sink (buildctl -> buildkitd)",
    "download": "a build result, sink -> client (buildkitd's local/tar exporter -> buildctl)",
}
TLS_LEGS = (
    "; every leg TLS: client -> TLS sink, client -> haproxy tcp (TLS passed through) -> TLS sink, "
    "client -> gateway TLS listener -> TLS sink; ratios against TLS direct"
)


async def amain(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    size = int(args.size_mb * (1 << 20))
    print(f"building {args.size_mb} MB payload ...", flush=True)
    payload = Payload(size, tuple(args.msg_sizes))
    results: dict[str, dict[str, object]] = {d: {} for d in args.directions}
    rc = 0
    for ends in args.ends:
        tls = ", TLS" if args.tls else ""
        print(f"\n=== {ends} ends{tls}: {ENDS[ends]}{TLS_LEGS if args.tls else ''} ===", flush=True)
        code, by_direction = await run_ends(args, ends, payload, t_start)
        for direction, summary in by_direction.items():
            results[direction][ends] = summary
        rc = max(rc, code)  # 0 only if every kind of ends had a leg that worked, both ways
    if args.json:
        doc: dict[str, object] = {
            "size_mb": args.size_mb,
            "messages": payload.messages,
            "tls": args.tls,
            "directions": args.directions,
        }
        # uploads under "ends" as before downloads existed; downloads under "download"
        if "upload" in results:
            doc["ends"] = results["upload"]
        if "download" in results:
            doc["download"] = results["download"]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return rc


def _work_dir(size: int) -> str | None:
    """Where the work ends keep their files: tmpfs if it has room, else the default temp dir.

    tmpfs keeps disk writeback, which is no proxy's doing, out of the timings. The payload file,
    the warm-up file and the sink's file of the current upload (or the client's file of the
    current download) must fit: about 2.1 x the size.
    """
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 2.5 * size:
        return shm
    return None


async def run_ends(
    args: argparse.Namespace, ends: str, payload: Payload, t_start: float
) -> tuple[int, dict[str, object]]:
    """Every leg with one kind of ends (fresh sink and proxies), each direction in turn;
    returns (rc, {direction: summary})."""
    size = payload.data_bytes
    tmp = Path(tempfile.mkdtemp(prefix="bench-upload-"))
    procs: list[Proc] = []
    legs = [Leg(n) for n in args.legs]
    sink_argv = [sys.executable, str(BENCH_DIR / "sink.py"), "--port", "0"]
    work: Path | None = None
    output: OutputWork | None = None
    warm = Payload(min(size, 8 << 20), tuple(args.msg_sizes))
    tls: BenchTls | None = None
    downloads = "download" in args.directions
    try:
        if args.tls:
            tls = BenchTls.make(tmp / "tls")
            sink_argv += ["--tls-cert", str(tls.sink_cert), "--tls-key", str(tls.sink_key)]
        if ends == "work" or downloads:
            work = Path(tempfile.mkdtemp(prefix="bench-upload-work-", dir=_work_dir(size)))
        if ends == "work":
            assert work is not None
            payload.to_file(work / "context.bin")
            warm.to_file(work / "warm.bin")
            sink_argv += ["--work-dir", str(work)]
            if downloads:
                output = OutputWork(work)
        elif downloads:  # the sink serves them from memory, loaded at its start
            assert work is not None
            payload.write(work / "context.bin")
            warm.write(work / "warm.bin")
        if downloads:
            sink_argv += ["--serve", str(work / "context.bin"), "--serve", str(work / "warm.bin")]
        sink = Proc(
            "sink",
            sink_argv,
            tmp / "sink.log",
            stdout=subprocess.PIPE,
        )
        procs.append(sink)
        assert sink.p.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(sink.p.stdout.readline), 30)
        if not line.startswith(b"SINK READY"):
            print(f"sink failed to start: {line!r}\n{sink.tail()}", file=sys.stderr)
            return 2, {}
        sink_port = int(line.split()[2])
        for lg in legs:
            if lg.name == "direct":
                lg.port = sink_port
                lg.note = f"sink on 127.0.0.1:{sink_port} (bench/sink.py, pid {sink.pid})"
                if tls is not None:
                    lg.tls_name = SINK_TLS_NAME
                    lg.note += f", TLS as {SINK_TLS_NAME}"
            elif lg.name == "haproxy":
                await start_haproxy(lg, args, tmp, sink_port)
                if tls is not None:  # mode tcp: the client's TLS goes through to the sink
                    lg.tls_name = SINK_TLS_NAME
                    lg.note += " (mode tcp: the client's TLS passed through to the TLS sink)"
            elif lg.name in ("gateway", "gateway-base"):
                await start_gateway(lg, args, tmp, sink_port, tls)
            if lg.proc:
                procs.append(lg.proc)
        for lg in legs:
            lg.start_skipped = lg.skipped
        summaries: dict[str, object] = {}
        code = 0
        for direction in args.directions:
            for lg in legs:  # each direction starts afresh, with the same processes
                lg.runs, lg.errors, lg.skipped = [], [], lg.start_skipped
            print(f"\n--- {direction}: {DIRECTIONS[direction]} ---", flush=True)
            # warm-up: one small transfer per leg (also the gateway's go/no-go)
            for lg in legs:
                if lg.skipped:
                    continue
                try:
                    await run_upload(
                        lg, warm, sink, min(args.timeout, 30), tls, direction, output
                    )
                except (UploadError, OSError) as e:
                    tail = lg.proc.tail() if lg.proc else ""
                    lg.skipped = f"warm-up {direction} failed: {e}" + (f"\n{tail}" if tail else "")
            active = [lg for lg in legs if not lg.skipped]
            for rep in range(args.repeats):
                order = active[rep % len(active) :] + active[: rep % len(active)] if active else []
                for lg in order:
                    if time.monotonic() - t_start > args.deadline:
                        lg.errors.append("global deadline reached")
                        continue
                    if lg.proc and not lg.proc.alive():
                        lg.errors.append(f"{lg.proc.name} exited ({lg.proc.p.returncode})")
                        continue
                    if len(lg.errors) >= 2 and not lg.runs:
                        continue  # failed twice, never worked: stop spending time on it
                    try:
                        r = await run_upload(
                            lg, payload, sink, args.timeout, tls, direction, output
                        )
                        r["round"] = rep
                        lg.runs.append(r)
                        print(
                            f"  run {rep + 1} {lg.name:<8} {float(r['seconds']):.3f} s"
                            f"  proxy CPU {fmt(r['proxy_cpu'], '.2f')} s  frames {r['frames']}",
                            flush=True,
                        )
                    except (UploadError, OSError) as e:
                        lg.errors.append(str(e))
                        print(f"  run {rep + 1} {lg.name:<8} FAILED: {e}", flush=True)
            print(
                f"\npython {platform.python_version()}, {os.cpu_count()} CPUs, "
                f"total {time.monotonic() - t_start:.0f} s"
            )
            summaries[direction] = report(legs, payload, args, ends, direction)
            if not any(lg.runs for lg in legs):
                code = 1
        return code, summaries
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if output is not None:
            output.close()
        if work is not None:
            payload.close_file()
            warm.close_file()
            shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="BuildKit Session-tunnel upload: direct vs HAProxy tcp vs buildkit-gateway."
    )
    ap.add_argument("--size-mb", type=float, default=200, help="upload size (default 200)")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per leg, interleaved (9)")
    ap.add_argument(
        "--legs",
        default="direct,haproxy,gateway",
        help="comma list of direct,haproxy,gateway (default all)",
    )
    ap.add_argument(
        "--gateway-cmd",
        default=None,
        help="gateway command (shell words); --listen/--replica are appended. Default: "
        "buildkit-gateway next to this python, else on PATH",
    )
    ap.add_argument(
        "--baseline-gateway-cmd",
        default=None,
        help="a second gateway measured in the same run as leg 'gateway-base' (e.g. an older "
        "commit: 'env PYTHONPATH=/tmp/old .venv/bin/python -m gateway'); see bench/compare",
    )
    ap.add_argument("--haproxy", default=None, help="haproxy binary (default: from PATH)")
    ap.add_argument(
        "--msg-sizes",
        default=",".join(map(str, DEFAULT_MSG_SIZES)),
        help="BytesMessage data sizes cycled (default 24000,4000,2500: ~10 KB mean)",
    )
    ap.add_argument(
        "--ends",
        default="lean,work",
        help="comma list, each a full run (default both): lean = client and sink only move "
        "bytes; work = they also do buildctl's and buildkitd's I/O per message (the client "
        "reads each message from a file; the sink copies, sha256-hashes and writes it to a file)",
    )
    ap.add_argument(
        "--direction",
        default="upload,download",
        help="comma list (default both), each measured with every kind of ends: upload = a "
        "build context streamed client -> sink on the Session; download = a build result "
        "streamed sink -> client on the Session once the Solve arrives",
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="every leg over TLS, against TLS direct: the sink serves TLS (ALPN h2), the client "
        "offers ALPN h2; haproxy passes TLS through (mode tcp); the gateway terminates TLS on its "
        "listener (--tlscert/--tlskey) and dials the sink over TLS (--replica-tlscacert, "
        "--replica-servername). Certificates are made at run time with trustme",
    )
    ap.add_argument("--timeout", type=float, default=30, help="limit per upload, s (30)")
    ap.add_argument(
        "--ready-timeout",
        type=float,
        default=15,
        help="time for the gateway to listen and answer ListWorkers, s (15)",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=200,
        help="no new run starts after this many seconds (200)",
    )
    ap.add_argument("--json", default=None, help="also write results as JSON to this file")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with logs/config")
    args = ap.parse_args(argv)
    args.legs = [x.strip() for x in args.legs.split(",") if x.strip()]
    if args.baseline_gateway_cmd and "gateway-base" not in args.legs:
        args.legs.append("gateway-base")
    bad = set(args.legs) - {"direct", "haproxy", "gateway", "gateway-base"}
    if bad:
        ap.error(f"unknown legs: {', '.join(sorted(bad))}")
    if "gateway-base" in args.legs and not args.baseline_gateway_cmd:
        ap.error("leg gateway-base needs --baseline-gateway-cmd")
    args.ends = list(dict.fromkeys(x.strip() for x in args.ends.split(",") if x.strip()))
    if not args.ends or set(args.ends) - set(ENDS):
        ap.error(f"--ends: a comma list of {', '.join(ENDS)}")
    args.directions = list(
        dict.fromkeys(x.strip() for x in args.direction.split(",") if x.strip())
    )
    if not args.directions or set(args.directions) - set(DIRECTIONS):
        ap.error(f"--direction: a comma list of {', '.join(DIRECTIONS)}")
    args.msg_sizes = [int(x) for x in args.msg_sizes.split(",")]
    if any(s <= 0 or s > 16 << 20 for s in args.msg_sizes):
        ap.error("--msg-sizes must be between 1 and 16 MiB")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(interruptible(args))
    return uvloop.run(interruptible(args))


async def interruptible(args: argparse.Namespace) -> int:
    """amain, cancelled on SIGTERM/SIGHUP (SIGINT: the runner cancels it), children stopped."""
    return await stoppable(amain(args))


async def stoppable(work: Coroutine[Any, Any, int], *,
                    cleanup: Callable[[], None] = lambda: None) -> int:
    """`work`, cancelled on SIGTERM/SIGHUP: `cleanup` runs, then 128 + the signal is returned
    (SIGINT: the runner cancels it; the CancelledError goes on after `cleanup`). The finally
    blocks of `work` stop every process it started."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    got: list[int] = []

    def stop(signum: int) -> None:
        got.append(signum)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await work
    except asyncio.CancelledError:
        cleanup()
        if not got:
            raise
        print(f"\ninterrupted by signal {got[0]}: stopped", file=sys.stderr, flush=True)
        return 128 + got[0]


if __name__ == "__main__":
    sys.exit(main())
