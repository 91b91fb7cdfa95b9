"""Outbound flow control of one HTTP/2 connection: send windows and per-stream queues.

Design: DATA that fits both the stream's and the connection's send window is written at once
(the common case costs two appends). Otherwise it waits in its stream's queue; a window update
drains the queues of the streams it unblocks, oldest blocked first. Header blocks (a response's
headers and trailers), which must stay behind their stream's data but are not flow-controlled,
wait in the same queue as header lists, and are encoded only when they are written
(`header_frames`): they use the connection's HPACK table, so they must be encoded in the order
they go on the wire, and one dropped with its stream never touches the table. A frame is cut
to fit a window only when the window is a large part of the peer's initial window (so a peer
with tiny windows still makes progress); cutting 16 KB frames to fit a leftover of a few KB
would multiply frames, and waiting for the next update is cheaper.

Invariants (checked by property tests): a send never makes a window negative (only a lowered
SETTINGS_INITIAL_WINDOW_SIZE can); a stream's frames leave in the order they were offered; every
queued byte is either written, or reported as dropped when its stream is closed. `on_sent(sid,
n)` reports DATA bytes written from a queue (the caller returns that credit to the source);
`on_end(sid)` reports that a stream's last frame (END_STREAM) has been written.
No I/O: frames are appended to the `out` list the caller flushes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from gateway.h2.frames import (
    DATA,
    DEFAULT_WINDOW,
    FLAG_END_STREAM,
    FLOW_CONTROL_ERROR,
    MAX_WINDOW,
    ProtocolError,
    StreamError,
    frame_header_struct,
)
from gateway.h2.headers import Headers

Chunk = bytes | memoryview
_PACK = frame_header_struct.pack
_DATA = 0
_HEADERS = 1
# Queue item: (kind, payload, last): DATA payloads (a Chunk) count against windows, HEADERS (a
# header list, encoded when written) do not; `last` marks the stream's final frame (END_STREAM).
_Item = tuple[int, Any, bool]


class _Out:
    __slots__ = ("queue", "queued", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.queue: deque[_Item] = deque()
        self.queued = 0


def _ignore_sent(sid: int, n: int) -> None:
    pass


def _ignore_end(sid: int) -> None:
    pass


def _no_headers(sid: int, headers: Headers, end_stream: bool) -> bytes:
    raise RuntimeError("this connection sends no header blocks through its scheduler")


class SendScheduler:
    __slots__ = ("_blocked", "_streams", "conn_window", "header_frames", "initial_window",
                 "on_end", "on_sent")

    def __init__(
        self,
        *,
        on_sent: Callable[[int, int], None] = _ignore_sent,
        on_end: Callable[[int], None] = _ignore_end,
        header_frames: Callable[[int, Headers, bool], bytes] = _no_headers,
    ) -> None:
        self.conn_window = DEFAULT_WINDOW
        self.initial_window = DEFAULT_WINDOW
        self.on_sent = on_sent
        self.on_end = on_end
        # (sid, headers, end_stream) -> the HEADERS (+ CONTINUATION) frames, encoded now
        self.header_frames = header_frames
        self._streams: dict[int, _Out] = {}
        self._blocked: dict[int, None] = {}  # ordered set of streams waiting for window

    def detach(self) -> None:
        """Drops the callbacks once the connection is gone: they are its bound methods, a
        cycle that only the cyclic GC would otherwise free (and it may run rarely)."""
        self.on_sent = _ignore_sent
        self.on_end = _ignore_end
        self.header_frames = _no_headers

    def open(self, sid: int) -> None:
        self._streams[sid] = _Out(self.initial_window)

    def is_open(self, sid: int) -> bool:
        return sid in self._streams

    def window(self, sid: int) -> int:
        st = self._streams.get(sid)
        return st.window if st is not None else 0

    def queued_bytes(self, sid: int) -> int:
        st = self._streams.get(sid)
        return st.queued if st is not None else 0

    def total_queued(self) -> int:
        return sum(st.queued for st in self._streams.values())

    def close(self, sid: int) -> int:
        """Forgets a stream; returns the DATA bytes dropped from its queue."""
        st = self._streams.pop(sid, None)
        self._blocked.pop(sid, None)
        return st.queued if st is not None else 0

    def data(self, sid: int, payload: Chunk, end_stream: bool, out: list[Chunk]) -> int:
        """Writes or queues DATA; returns the bytes written now (-1: stream not open)."""
        st = self._streams.get(sid)
        if st is None:
            return -1
        n = len(payload)
        if not st.queue and n <= st.window and n <= self.conn_window:
            st.window -= n
            self.conn_window -= n
            out.append(_PACK(n >> 8, n & 0xFF, DATA, FLAG_END_STREAM if end_stream else 0, sid))
            if n:
                out.append(payload)
            if end_stream:
                del self._streams[sid]
                self.on_end(sid)
            return n
        queue = st.queue
        queue.append((_DATA, payload, end_stream))
        st.queued += n
        if len(queue) == 1:  # a longer queue is already blocked: only window changes drain it
            self._drain(sid, st, out)
        return 0

    def data_run(self, sid: int, payloads: Sequence[Chunk], out: list[Chunk]) -> int:
        """`data()` for consecutive non-final DATA payloads of one stream, in one call.

        Returns the bytes written now (-1: stream not open). What the windows do not take is
        queued exactly as `data()` would have queued it, frame by frame.
        """
        st = self._streams.get(sid)
        if st is None:
            return -1
        written = 0
        taken = 0
        if not st.queue:
            avail = st.window if st.window < self.conn_window else self.conn_window
            append = out.append
            pack = _PACK
            for payload in payloads:
                n = len(payload)
                if n > avail:
                    break
                append(pack(n >> 8, n & 0xFF, DATA, 0, sid))
                if n:
                    append(payload)
                avail -= n
                written += n
                taken += 1
            st.window -= written
            self.conn_window -= written
        if taken < len(payloads):  # the windows are spent: the rest waits its turn
            queue = st.queue
            drain = not queue
            for payload in payloads[taken:]:
                queue.append((_DATA, payload, False))
                st.queued += len(payload)
            if drain:
                self._drain(sid, st, out)
        return written

    def headers(self, sid: int, headers: Headers, out: list[Chunk], *, end_stream: bool) -> bool:
        """Writes a header block behind the stream's queued DATA, encoded (`header_frames`)
        only when it is written, so blocks reach the peer's HPACK decoder in the order they
        were encoded. `end_stream` marks the stream's final frame (trailers). Returns False if
        the stream is not open."""
        st = self._streams.get(sid)
        if st is None:
            return False
        if not st.queue:
            out.append(self.header_frames(sid, headers, end_stream))
            if end_stream:
                del self._streams[sid]
                self.on_end(sid)
            return True
        st.queue.append((_HEADERS, headers, end_stream))  # behind DATA: written by a drain
        return True

    def window_update(self, sid: int, increment: int, out: list[Chunk]) -> None:
        """Applies a WINDOW_UPDATE from the peer (sid 0: the connection) and drains queues."""
        if sid == 0:
            self.conn_window += increment
            if self.conn_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._pump(out)
            return
        st = self._streams.get(sid)
        if st is None:
            return
        st.window += increment
        if st.window > MAX_WINDOW:
            raise StreamError(sid, FLOW_CONTROL_ERROR, f"stream {sid} window above 2^31-1")
        if st.queue:
            self._drain(sid, st, out)

    def set_initial_window(self, value: int, out: list[Chunk]) -> None:
        """SETTINGS_INITIAL_WINDOW_SIZE from the peer: the difference applies to open streams."""
        if value > MAX_WINDOW:
            raise ProtocolError(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
        delta = value - self.initial_window
        self.initial_window = value
        if not delta:
            return
        for st in self._streams.values():
            st.window += delta
            if st.window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "stream window above 2^31-1")
        if delta > 0:
            for sid in list(self._blocked):
                blocked = self._streams.get(sid)
                if blocked is not None:
                    self._drain(sid, blocked, out)

    def _pump(self, out: list[Chunk]) -> None:
        for sid in list(self._blocked):
            if self.conn_window <= 0:
                return
            st = self._streams.get(sid)
            if st is None:
                self._blocked.pop(sid, None)
                continue
            del self._blocked[sid]  # re-queued at the end if still blocked: round robin
            self._drain(sid, st, out)

    def _drain(self, sid: int, st: _Out, out: list[Chunk]) -> None:
        queue = st.queue
        split_at = max(1, min(self.initial_window, DEFAULT_WINDOW) // 2)
        stream_window = st.window
        conn_window = self.conn_window
        append = out.append
        pack = _PACK
        sent = 0
        ended = False
        while queue:
            kind, payload, last = queue[0]
            if kind != _DATA:
                queue.popleft()
                append(self.header_frames(sid, payload, last))
                if last:
                    ended = True
                    break
                continue
            n = len(payload)
            avail = stream_window if stream_window < conn_window else conn_window
            if n > avail:
                if avail < split_at or avail <= 0:
                    break
                append(pack(avail >> 8, avail & 0xFF, DATA, 0, sid))
                append(payload[:avail])
                queue[0] = (_DATA, payload[avail:], last)
                stream_window -= avail
                conn_window -= avail
                sent += avail
                continue
            queue.popleft()
            stream_window -= n
            conn_window -= n
            sent += n
            append(pack(n >> 8, n & 0xFF, DATA, FLAG_END_STREAM if last else 0, sid))
            if n:
                append(payload)
            if last:
                ended = True
                break
        st.window = stream_window
        self.conn_window = conn_window
        st.queued -= sent
        if sent:
            self.on_sent(sid, sent)
        if ended:
            self._streams.pop(sid, None)
            self._blocked.pop(sid, None)
            self.on_end(sid)
        elif queue:
            self._blocked[sid] = None
        else:
            self._blocked.pop(sid, None)
