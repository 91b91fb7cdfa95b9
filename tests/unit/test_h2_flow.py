"""gateway/h2/flow.py: SendScheduler windows, queues, ordering and accounting."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

import hpack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from gateway.h2 import frames as fr
from gateway.h2.flow import SendScheduler
from gateway.h2.frames import FrameReader, ProtocolError
from gateway.h2.headers import HeaderEncoder, Headers
from tests.fakes.frames import named

TRAILERS = [(b"grpc-status", b"0")]
# Blocks the state machine sends: repeated ones (indexed after the first) and ones that change
# (each a new table entry, evicting older ones from a small table).
header_lists = st.one_of(
    st.just(TRAILERS),
    st.just([(b":status", b"200"), (b"content-type", b"application/grpc")]),
    st.builds(lambda m: [(b"grpc-status", b"2"), (b"x-detail", m)],
              st.sampled_from([b"a", b"b" * 40, b"c" * 300])),
)


def table_frames(encoder: HeaderEncoder) -> Callable[[int, Headers, bool], bytes]:
    """A scheduler's `header_frames`: blocks with `encoder`'s table, framed."""
    def frames(sid: int, headers: Headers, end_stream: bool) -> bytes:
        return fr.header_block(sid, encoder.encode(headers), end_stream=end_stream,
                               max_frame=16384)
    return frames


class Recorder:
    def __init__(self) -> None:
        self.sent: dict[int, int] = {}
        self.ended: list[int] = []

    def on_sent(self, sid: int, n: int) -> None:
        assert n > 0
        self.sent[sid] = self.sent.get(sid, 0) + n

    def on_end(self, sid: int) -> None:
        self.ended.append(sid)


def wire(out: list) -> bytes:
    return b"".join(bytes(c) for c in out)


def data_frames(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    return [(t, flags, sid, bytes(payload))
            for t, flags, sid, payload, _n in FrameReader().feed(raw)]


class _Stream:
    def __init__(self, sid: int, window: int) -> None:
        self.sid = sid
        self.offered = bytearray()
        self.received = bytearray()
        self.last_offered = False  # END_STREAM or trailers handed to the scheduler
        # header blocks offered: (bytes offered before it, its list), in order
        self.blocks: deque[tuple[int, Headers]] = deque()
        self.immediate = 0
        self.dropped = 0
        self.closed = False  # close() called
        self.finished_on_wire = False  # END_STREAM seen on the wire
        self.peer_window = window  # the receiving peer's view of the stream window
        self.frame_ends: list[int] = []  # offsets where offered DATA frames end


class SchedulerMachine(RuleBasedStateMachine):
    """Drives a SendScheduler and checks its output as the receiving peer sees it."""

    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.rec = Recorder()
        self.encoder = HeaderEncoder()
        self.s = SendScheduler(on_sent=self.rec.on_sent, on_end=self.rec.on_end,
                               header_frames=table_frames(self.encoder))
        # The twin gets the same calls, except that a run goes to it frame by frame through
        # data(): both must write the same bytes and end in the same state.
        self.twin_rec = Recorder()
        self.twin_encoder = HeaderEncoder()
        self.twin = SendScheduler(on_sent=self.twin_rec.on_sent, on_end=self.twin_rec.on_end,
                                  header_frames=table_frames(self.twin_encoder))
        self.reader = FrameReader()
        # The peer's HPACK decoder (the hpack library's, strict about table size updates)
        # reads the blocks in wire order, whatever order the streams' queues released them in.
        self.decoder = hpack.Decoder()
        self.streams: dict[int, _Stream] = {}
        self.next_sid = 1
        self.peer_conn = fr.DEFAULT_WINDOW
        self.peer_initial = fr.DEFAULT_WINDOW
        self.rng = random.Random(0)

    # ---- the peer ------------------------------------------------------------------------

    def absorb(self, out: list) -> None:
        for f in named(self.reader.feed(wire(out))):
            st_ = self.streams[f.stream_id]
            assert not st_.finished_on_wire, f"frame after END_STREAM on {f.stream_id}"
            assert not st_.closed, f"frame on closed stream {f.stream_id}"
            if f.type == fr.DATA:
                n = len(f.payload)
                if n:
                    assert st_.peer_window >= n, "send made a stream window negative"
                    assert self.peer_conn >= n, "send made the connection window negative"
                st_.peer_window -= n
                self.peer_conn -= n
                st_.received += f.payload
                assert st_.offered.startswith(st_.received), "stream bytes out of order"
            else:
                assert f.type == fr.HEADERS
                assert st_.blocks, "a header block nobody offered"
                offset, headers = st_.blocks.popleft()
                assert len(st_.received) == offset, "a block out of order with its data"
                decoded = [(bytes(n), bytes(v))
                           for n, v in self.decoder.decode(bytes(f.payload), raw=True)]
                assert decoded == headers, "a block decoded against the wrong table"
            if f.flags & fr.FLAG_END_STREAM:
                assert st_.last_offered
                assert st_.received == st_.offered
                st_.finished_on_wire = True
        assert self.reader.buffered == 0

    # ---- rules -------------------------------------------------------------------------------

    @rule(target=live)
    def open_stream(self) -> int:
        sid = self.next_sid
        self.next_sid += 2
        self.s.open(sid)
        self.twin.open(sid)
        self.streams[sid] = _Stream(sid, self.peer_initial)
        return sid

    @rule(
        sid=live,
        size=st.one_of(st.integers(0, 16384), st.just(16384), st.integers(1, 40)),
        end=st.booleans(),
    )
    def data(self, sid: int, size: int, end: bool) -> None:
        st_ = self.streams[sid]
        if st_.last_offered or st_.closed:
            return
        payload = self.rng.randbytes(size)
        out: list = []
        n = self.s.data(sid, payload, end, out)
        twin_out: list = []
        assert self.twin.data(sid, payload, end, twin_out) == n
        assert wire(out) == wire(twin_out)
        assert n in (0, size)
        if n and n == size:
            # Written at once: it must be the whole frame, nothing else in between.
            assert len(wire(out)) == 9 + size
        st_.offered += payload
        st_.frame_ends.append(len(st_.offered))
        st_.immediate += n
        st_.last_offered = end
        self.absorb(out)

    @rule(
        sid=live,
        sizes=st.lists(st.one_of(st.just(16384), st.integers(0, 16384), st.integers(1, 40)),
                       min_size=1, max_size=12),
    )
    def data_run(self, sid: int, sizes: list[int]) -> None:
        """A run of non-final frames in one call: the same wire and accounting as one by one."""
        st_ = self.streams[sid]
        if st_.last_offered or st_.closed:
            return
        payloads = [self.rng.randbytes(size) for size in sizes]
        out: list = []
        n = self.s.data_run(sid, payloads, out)
        twin_out: list = []
        assert sum(self.twin.data(sid, p, False, twin_out) for p in payloads) == n
        assert wire(out) == wire(twin_out), "a run must go out as its frames one by one would"
        # What is written at once is a prefix of the run, frame by frame, each frame whole.
        done = 0
        for size in sizes:
            if done == n:
                break
            done += size
        assert done == n, "a run must be written whole frames first"
        for payload in payloads:
            st_.offered += payload
            st_.frame_ends.append(len(st_.offered))
        st_.immediate += n
        self.absorb(out)

    @rule(sid=live, headers=header_lists, end=st.booleans())
    def send_headers(self, sid: int, headers: Headers, end: bool) -> None:
        """Response headers (more DATA may follow) or trailers (`end`), behind queued DATA."""
        st_ = self.streams[sid]
        if st_.last_offered or st_.closed:
            return
        out: list = []
        assert self.s.headers(sid, headers, out, end_stream=end)
        twin_out: list = []
        assert self.twin.headers(sid, headers, twin_out, end_stream=end)
        assert wire(out) == wire(twin_out)
        st_.last_offered = end
        st_.blocks.append((len(st_.offered), headers))
        self.absorb(out)

    @rule(value=st.sampled_from([0, 64, 200, 4096]))
    def lower_table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE, acknowledged here: blocks after this point
        on the wire are decoded under it, and the first must shrink the table (RFC 7541)."""
        self.encoder.peer_limit(value)
        self.twin_encoder.peer_limit(value)
        self.decoder.max_allowed_table_size = min(self.decoder.max_allowed_table_size, value)

    @rule(sid=live, inc=st.one_of(st.integers(1, 2000), st.integers(1, 200_000)))
    def stream_window_update(self, sid: int, inc: int) -> None:
        st_ = self.streams[sid]
        if st_.peer_window + inc > 1 << 29:
            return
        out: list = []
        if self.s.is_open(sid):
            st_.peer_window += inc
        self.s.window_update(sid, inc, out)
        twin_out: list = []
        self.twin.window_update(sid, inc, twin_out)
        assert wire(out) == wire(twin_out)
        self.absorb(out)

    @rule(inc=st.one_of(st.integers(1, 5000), st.integers(1, 1 << 20)))
    def connection_window_update(self, inc: int) -> None:
        if self.peer_conn + inc > 1 << 30:
            return
        out: list = []
        self.s.window_update(0, inc, out)
        twin_out: list = []
        self.twin.window_update(0, inc, twin_out)
        assert wire(out) == wire(twin_out)
        self.peer_conn += inc
        self.absorb(out)

    @rule(value=st.one_of(st.integers(0, 1000), st.integers(65535, 700_000),
                          st.just(fr.DEFAULT_WINDOW)))
    def set_initial_window(self, value: int) -> None:
        out: list = []
        delta = value - self.peer_initial
        for sid, st_ in self.streams.items():
            if self.s.is_open(sid):
                st_.peer_window += delta
        self.s.set_initial_window(value, out)
        twin_out: list = []
        self.twin.set_initial_window(value, twin_out)
        assert wire(out) == wire(twin_out)
        self.peer_initial = value
        self.absorb(out)

    @rule(sid=consumes(live))
    def close(self, sid: int) -> None:
        st_ = self.streams[sid]
        queued = self.s.queued_bytes(sid)
        st_.dropped = self.s.close(sid)
        assert self.twin.close(sid) == st_.dropped
        assert st_.dropped == queued
        assert not self.s.is_open(sid)
        st_.closed = True

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def windows_match_the_peer(self) -> None:
        assert self.s.conn_window == self.peer_conn
        for sid, st_ in self.streams.items():
            if self.s.is_open(sid):
                assert self.s.window(sid) == st_.peer_window

    @invariant()
    def twin_in_the_same_state(self) -> None:
        assert self.twin.conn_window == self.s.conn_window
        for sid in self.streams:
            assert self.twin.is_open(sid) == self.s.is_open(sid)
            assert self.twin.window(sid) == self.s.window(sid)
            assert self.twin.queued_bytes(sid) == self.s.queued_bytes(sid)
        assert self.twin_rec.sent == self.rec.sent
        assert self.twin_rec.ended == self.rec.ended

    @invariant()
    def accounting(self) -> None:
        for sid, st_ in self.streams.items():
            sent = self.rec.sent.get(sid, 0)
            # Everything written was reported either as an immediate return or via on_sent.
            assert sent + st_.immediate == len(st_.received)
            queued = self.s.queued_bytes(sid)
            assert len(st_.received) + queued + st_.dropped == len(st_.offered)
            if st_.closed or sid in self.rec.ended:
                assert sent + st_.immediate + st_.dropped == len(st_.offered)
        assert self.s.total_queued() == sum(self.s.queued_bytes(s) for s in self.streams)

    @invariant()
    def ends_reported_once_and_only_on_the_wire(self) -> None:
        assert len(self.rec.ended) == len(set(self.rec.ended))
        for sid in self.rec.ended:
            assert self.streams[sid].finished_on_wire or self.streams[sid].closed
            assert not self.s.is_open(sid)
        for sid, st_ in self.streams.items():
            if st_.finished_on_wire:
                assert sid in self.rec.ended

    @invariant()
    def no_stall(self) -> None:
        # A queued head frame that fits both windows must have been written.
        for sid, st_ in self.streams.items():
            if not self.s.is_open(sid) or not self.s.queued_bytes(sid):
                continue
            done = len(st_.received)
            head = next((end - done for end in st_.frame_ends if end > done), 0)
            if head:
                assert min(self.s.window(sid), self.s.conn_window) < head

    def teardown(self) -> None:
        # Generous windows: everything still queued must go out, in order.
        out: list = []
        for sid, st_ in self.streams.items():
            if self.s.is_open(sid):
                inc = (1 << 30) - self.s.window(sid)
                self.s.window_update(sid, inc, out)
                st_.peer_window += inc
        inc = (1 << 30) - self.s.conn_window
        self.s.window_update(0, inc, out)
        self.peer_conn += inc
        self.absorb(out)
        assert self.s.total_queued() == 0
        for sid, st_ in self.streams.items():
            if st_.closed:
                continue
            assert st_.received == st_.offered
            assert not st_.blocks, "a header block never written"
            assert st_.finished_on_wire == st_.last_offered
            assert self.s.is_open(sid) == (not st_.last_offered)
            assert self.rec.sent.get(sid, 0) + st_.immediate == len(st_.offered)


SchedulerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSchedulerMachine = SchedulerMachine.TestCase


# ---- deterministic behaviour ---------------------------------------------------------------


def test_fourth_full_frame_waits_for_update_instead_of_being_cut() -> None:
    rec = Recorder()
    s = SendScheduler(on_sent=rec.on_sent, on_end=rec.on_end)
    s.open(1)
    out: list = []
    chunk = bytes(16384)
    for _ in range(3):
        assert s.data(1, chunk, False, out) == 16384
    assert s.window(1) == s.conn_window == 65535 - 3 * 16384 == 16383
    out.clear()
    assert s.data(1, chunk, False, out) == 0
    assert out == []  # not cut into a 16383-byte piece
    assert s.queued_bytes(1) == 16384
    s.window_update(1, 16384, out)
    assert out == []  # still blocked by the connection window
    s.window_update(0, 100_000, out)
    got = data_frames(wire(out))
    assert [len(p) for *_, p in got] == [16384]
    assert rec.sent == {1: 16384}
    assert s.queued_bytes(1) == 0
    assert s.window(1) == 16383
    # The stream is no longer blocked: the next frame that fits goes out at once.
    out.clear()
    assert s.data(1, bytes(100), True, out) == 100
    assert rec.ended == [1]
    assert not s.is_open(1)


def test_tiny_initial_window_cuts_frames_so_progress_happens() -> None:
    rec = Recorder()
    s = SendScheduler(on_sent=rec.on_sent, on_end=rec.on_end)
    out: list = []
    s.set_initial_window(1000, out)
    s.open(1)
    payload = random.Random(1).randbytes(16384)
    assert s.data(1, payload, True, out) == 0
    got = data_frames(wire(out))
    assert [len(p) for *_, p in got] == [1000]
    assert s.window(1) == 0
    received = b"".join(p for *_, p in got)
    for _ in range(20):
        out.clear()
        s.window_update(1, 1000, out)
        got = data_frames(wire(out))
        assert all(len(p) <= 1000 for *_, p in got)
        received += b"".join(p for *_, p in got)
        if rec.ended:
            break
    assert received == payload
    assert rec.ended == [1]
    assert got[-1][1] == fr.FLAG_END_STREAM
    assert rec.sent == {1: 16384}


def test_leftover_below_half_window_waits() -> None:
    s = SendScheduler()
    s.open(1)
    out: list = []
    s.data(1, bytes(60000), False, out)
    out.clear()
    assert s.data(1, bytes(10000), False, out) == 0
    assert out == []  # 5535 left: waiting is cheaper than a small frame
    s.window_update(1, 40000, out)
    s.window_update(0, 40000, out)
    assert [len(p) for *_, p in data_frames(wire(out))] == [10000]


def test_raised_initial_window_drains_queued_streams() -> None:
    rec = Recorder()
    s = SendScheduler(on_sent=rec.on_sent)
    s.window_update(0, 10 << 20, [])
    out: list = []
    for sid in (1, 3):
        s.open(sid)
        s.data(sid, bytes(65535), False, out)
        assert s.data(sid, bytes(16384), False, out) == 0
    out.clear()
    s.set_initial_window(120_000, out)  # buildkitd's first step up
    got = data_frames(wire(out))
    assert sorted((sid, len(p)) for _, _, sid, p in got) == [(1, 16384), (3, 16384)]
    assert rec.sent == {1: 16384, 3: 16384}


def test_lowered_initial_window_makes_windows_negative_and_blocks() -> None:
    s = SendScheduler()
    s.open(1)
    out: list = []
    s.data(1, bytes(30000), False, out)
    s.set_initial_window(1000, out)
    assert s.window(1) == 1000 - 30000
    out.clear()
    assert s.data(1, bytes(10), False, out) == 0
    assert s.data(1, b"", False, out) == 0  # queued behind, even empty DATA keeps order
    assert out == []
    s.window_update(1, 29000, out)
    assert out == []  # window 0
    s.window_update(1, 10, out)
    assert [len(p) for *_, p in data_frames(wire(out))] == [10, 0]


def test_trailers_wait_behind_queued_data_and_are_encoded_when_written() -> None:
    encoder = HeaderEncoder()
    s = SendScheduler(header_frames=table_frames(encoder))
    s.open(1)
    s.open(3)
    out: list = []
    s.data(1, bytes(65535), False, out)
    s.data(1, b"tail", False, out)
    out.clear()
    assert s.headers(1, TRAILERS, out, end_stream=True)
    assert out == []
    assert s.is_open(1)
    later = [(b"grpc-status", b"5"), (b"grpc-message", b"not found")]
    s.headers(3, later, out, end_stream=True)  # encoded now, first on the wire
    s.window_update(1, 10, out)
    s.window_update(0, 10, out)
    got = data_frames(wire(out))
    assert [(t, f, sid) for t, f, sid, _ in got] == [
        (fr.HEADERS, fr.FLAG_END_HEADERS | fr.FLAG_END_STREAM, 3),
        (fr.DATA, 0, 1),
        (fr.HEADERS, fr.FLAG_END_HEADERS | fr.FLAG_END_STREAM, 1),
    ]
    decoder = hpack.Decoder()
    assert [decoder.decode(p, raw=True) for t, _, _, p in got if t == fr.HEADERS] == [
        later, TRAILERS]
    assert not s.is_open(1)


def test_headers_without_queue_are_written_at_once() -> None:
    ended: list[int] = []
    encoder = HeaderEncoder()
    s = SendScheduler(on_end=ended.append, header_frames=table_frames(encoder))
    s.open(5)
    out: list = []
    response = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    assert s.headers(5, response, out, end_stream=False)
    assert out == [fr.header_block(5, HeaderEncoder().encode(response), end_stream=False,
                                   max_frame=16384)]
    assert s.is_open(5)
    assert s.headers(5, TRAILERS, out, end_stream=True)
    assert ended == [5]
    assert not s.headers(5, TRAILERS, out, end_stream=True)
    assert s.data(5, b"x", False, out) == -1


def test_a_dropped_block_never_touches_the_table() -> None:
    encoder = HeaderEncoder()
    s = SendScheduler(header_frames=table_frames(encoder))
    s.open(1)
    out: list = []
    s.data(1, bytes(65535), False, out)
    s.data(1, b"tail", False, out)
    dropped = [(b"x-never", b"sent")]
    s.headers(1, dropped, out, end_stream=True)
    s.close(1)
    # never added to the table: still a literal (once in the table, it is a one-byte index)
    assert encoder.encode(dropped) == HeaderEncoder().encode(dropped)
    assert len(encoder.encode(dropped)) == 1


def test_close_returns_dropped_bytes_and_forgets() -> None:
    s = SendScheduler()
    s.open(1)
    out: list = []
    s.data(1, bytes(65535), False, out)
    s.data(1, bytes(300), False, out)
    s.data(1, bytes(200), True, out)
    assert s.queued_bytes(1) == s.total_queued() == 500
    assert s.close(1) == 500
    assert s.close(1) == 0
    assert s.window(1) == 0
    out.clear()
    s.window_update(0, 1 << 20, out)
    assert out == []


def test_connection_update_round_robins_blocked_streams() -> None:
    s = SendScheduler()
    out: list = []
    s.set_initial_window(1 << 20, out)
    for sid in (1, 3, 5):
        s.open(sid)
    s.data(1, bytes(65535), False, out)  # uses the whole connection window
    for sid in (1, 3, 5):
        s.data(sid, bytes(16384), False, out)
    out.clear()
    s.window_update(0, 3 * 16384, out)
    assert [sid for _, _, sid, _ in data_frames(wire(out))] == [1, 3, 5]


def test_windows_above_max_are_flow_control_errors() -> None:
    s = SendScheduler()
    s.open(1)
    with pytest.raises(ProtocolError) as err:
        s.window_update(0, fr.MAX_WINDOW, [])
    assert err.value.code == fr.FLOW_CONTROL_ERROR
    with pytest.raises(ProtocolError) as err:
        s.window_update(1, fr.MAX_WINDOW, [])
    assert err.value.code == fr.FLOW_CONTROL_ERROR
    with pytest.raises(ProtocolError) as err:
        s.set_initial_window(fr.MAX_WINDOW + 1, [])
    assert err.value.code == fr.FLOW_CONTROL_ERROR
    s2 = SendScheduler()
    s2.open(1)
    s2.window_update(1, fr.MAX_WINDOW - 65535, [])
    with pytest.raises(ProtocolError):
        s2.set_initial_window(65536, [])


def test_window_update_for_unknown_stream_is_ignored() -> None:
    s = SendScheduler()
    out: list = []
    s.window_update(9, 100, out)
    assert out == []
    assert not s.is_open(9)
