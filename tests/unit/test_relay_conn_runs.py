"""gateway/relay/conn.py: DATA frames reach the subclass in wire order, runs or not."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config
from gateway.h2 import frames as fr
from gateway.relay.backend import BackendConn
from gateway.relay.client import ClientConn
from gateway.relay.conn import CREDIT_BATCH, FRAMES_PER_TURN, H2Conn, flush_dirty
from tests.fakes.frames import named
from tests.fakes.relay_wiring import SESSION, WiredRelay, wired_relay

RELAY = config.load(["--replica", "tcp://127.0.0.1:9"], {}).relay


class Recording(H2Conn):
    """Records every stream event as (kind, sid, payload, flow_len, end), runs flattened."""

    role = "test"

    def __init__(self) -> None:
        super().__init__(RELAY, name="test")
        self.rx_bytes = [0]
        self.rx_index = 0
        self.events: list[tuple[str, int, bytes, int, int]] = []
        self.runs: list[int] = []

    def on_data(self, sid: int, payload: memoryview, flow_len: int, end: int) -> None:
        self.events.append(("data", sid, bytes(payload), flow_len, end))

    def on_data_run(self, sid: int, payloads: list[memoryview]) -> None:
        self.runs.append(len(payloads))
        super().on_data_run(sid, payloads)

    def on_rst(self, sid: int, code: int) -> None:
        self.events.append(("rst", sid, b"", 0, code))


def _padded(sid: int, payload: bytes, pad: int, end: bool) -> bytes:
    body = bytes([pad]) + payload + bytes(pad)
    flags = fr.FLAG_PADDED | (fr.FLAG_END_STREAM if end else 0)
    return fr.frame(fr.DATA, flags, sid, body)


_frame = st.tuples(
    st.sampled_from(["data", "data", "data", "padded", "rst"]),
    st.sampled_from([1, 3, 5]),
    st.binary(max_size=40),
    st.integers(0, 5),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(_frame, max_size=40), cut=st.integers(0, 2000))
def test_stream_events_keep_wire_order(frames: list[tuple[str, int, bytes, int, bool]],
                                       cut: int) -> None:
    conn = Recording()
    wire = b""
    expected: list[tuple[str, int, bytes, int, int]] = []
    for kind, sid, payload, pad, end in frames:
        if kind == "rst":
            wire += fr.rst_stream(sid, 8)
            expected.append(("rst", sid, b"", 0, 8))
        elif kind == "padded":
            wire += _padded(sid, payload, pad, end)
            expected.append(("data", sid, payload, len(payload) + pad + 1, int(end)))
        else:
            wire += fr.frame(fr.DATA, fr.FLAG_END_STREAM if end else 0, sid, payload)
            expected.append(("data", sid, payload, len(payload), int(end)))
    cut = min(cut, len(wire))
    conn.process(wire[:cut])  # any split of the reads gives the same events
    conn.process(wire[cut:])
    assert conn.events == expected


def test_consecutive_frames_of_a_stream_arrive_as_one_run() -> None:
    conn = Recording()
    wire = b"".join(fr.frame(fr.DATA, 0, 1, b"x" * 10) for _ in range(5))
    wire += fr.frame(fr.DATA, 0, 3, b"y")  # another stream: a new run
    wire += fr.frame(fr.DATA, fr.FLAG_END_STREAM, 3, b"z")  # ends its stream: on its own
    conn.process(wire)
    assert conn.runs == [5, 1]
    assert [e[1] for e in conn.events] == [1] * 5 + [3, 3]
    assert conn.events[-1][4] == 1


# ---- the relay's run handlers against the per-frame path -------------------------------------


class _FrameByFrameClient(ClientConn):
    on_data_run = H2Conn.on_data_run


class _FrameByFrameBackend(BackendConn):
    on_data_run = H2Conn.on_data_run


def _relay(runs: bool) -> WiredRelay:
    """Small windows on both hops, so runs get cut and queued."""
    return wired_relay(
        replica_frames=fr.settings([(fr.SETTINGS_INITIAL_WINDOW_SIZE, 20_000)]),
        client_settings=[(fr.SETTINGS_INITIAL_WINDOW_SIZE, 30_000)],
        client_cls=ClientConn if runs else _FrameByFrameClient,
        backend_cls=BackendConn if runs else _FrameByFrameBackend)


_step = st.one_of(
    st.tuples(st.just("up"), st.lists(st.integers(0, 16384), min_size=1, max_size=8)),
    st.tuples(st.just("down"), st.lists(st.integers(0, 16384), min_size=1, max_size=8)),
    st.tuples(st.just("replica-window"), st.one_of(st.integers(1, 40_000),
                                                   st.integers(1, 2 << 20))),
    st.tuples(st.just("client-window"), st.one_of(st.integers(1, 40_000),
                                                  st.integers(1, 2 << 20))),
)


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(_step, max_size=20))
def test_runs_write_and_credit_exactly_as_frame_by_frame(
        steps: list[tuple[str, object]]) -> None:
    """Uploads and downloads through both hops: the same frames go out on each, after every
    read, and the same credit is returned, whether DATA is handled as runs or frame by frame."""
    outputs = asyncio.run(_both_ways(steps))  # the hub wants a running loop
    assert outputs[0] == outputs[1]


def _hop(conn: H2Conn, raw: bytes) -> tuple[object, ...]:
    """What one hop was sent: every frame but WINDOW_UPDATE exactly, and the receive credit
    returned per stream, counting what is still pending. Runs may return credit in fewer,
    larger WINDOW_UPDATEs than frame-by-frame handling; the amounts must be the same."""
    frames = []
    credit: dict[int, int] = {}
    for f in named(fr.FrameReader().feed(raw)):
        if f.type == fr.WINDOW_UPDATE:
            credit[f.stream_id] = credit.get(f.stream_id, 0) + fr.parse_u32(f.payload)
        else:
            frames.append((f.type, f.flags, f.stream_id, bytes(f.payload)))
    credit[0] = credit.get(0, 0) + conn._pending_conn_credit
    for sid, pending in conn._pending_stream_credit.items():
        credit[sid] = credit.get(sid, 0) + pending
    uncredited = conn._outstanding - conn._pending_conn_credit  # received, credit not yet due
    return frames, {k: v for k, v in credit.items() if v}, uncredited


async def _both_ways(steps: list[tuple[str, object]]) -> list[list[object]]:
    outputs = []
    for runs in (True, False):
        relay = _relay(runs)
        client, backend, bsid = relay.client, relay.backend, relay.bsid
        seen = []
        for kind, arg in steps:
            if kind == "up":
                client.data_received(b"".join(fr.frame(fr.DATA, 0, SESSION, bytes(n))
                                              for n in arg))  # type: ignore[union-attr]
            elif kind == "down":
                backend.data_received(b"".join(fr.frame(fr.DATA, 0, bsid, bytes(n))
                                               for n in arg))  # type: ignore[union-attr]
            elif kind == "replica-window":
                backend.data_received(fr.window_update(0, arg)  # type: ignore[arg-type]
                                      + fr.window_update(bsid, arg))  # type: ignore[arg-type]
            else:
                client.data_received(fr.window_update(0, arg)  # type: ignore[arg-type]
                                     + fr.window_update(SESSION, arg))  # type: ignore[arg-type]
            seen.append((_hop(client, bytes(relay.client_tx.data)),
                         _hop(backend, bytes(relay.backend_tx.data))))
        outputs.append(seen)
    return outputs


def _window_updates(raw: bytes, sid: int) -> list[int]:
    return [fr.parse_u32(f.payload) for f in named(fr.FrameReader().feed(raw))
            if f.type == fr.WINDOW_UPDATE and f.stream_id == sid]


async def test_client_credit_follows_what_was_forwarded_in_small_batches() -> None:
    """Credit for an upload goes back as the replica takes it, in CREDIT_BATCH steps: the
    client is paced by the replica instead of sending its whole window in bursts."""
    relay = _relay(True)
    sent = 0
    for _ in range(20):  # 20 x 16 KiB, far more than the replica's window
        relay.client.data_received(fr.frame(fr.DATA, 0, SESSION, bytes(16384)))
        sent += 16384
    flush_dirty()
    for _ in range(40):  # the replica takes it 8 KiB at a time
        relay.backend.data_received(fr.window_update(0, 8192)
                                    + fr.window_update(relay.bsid, 8192))
        to_replica = named(fr.FrameReader().feed(bytes(relay.backend_tx.data)))
        forwarded = sum(len(f.payload) for f in to_replica
                        if f.type == fr.DATA and f.stream_id == relay.bsid)
        credited = sum(_window_updates(bytes(relay.client_tx.data), SESSION))
        assert forwarded - CREDIT_BATCH < credited <= forwarded
    assert forwarded == sent
    assert all(inc >= CREDIT_BATCH
               for inc in _window_updates(bytes(relay.client_tx.data), SESSION))


async def test_a_client_that_does_not_read_holds_its_streams_credit_not_the_connections() -> None:
    """Downloads toward a client with no window: the replica gets its connection credit back
    at once (the shared connection keeps flowing for everyone else), its stream credit only
    once the client takes the bytes."""
    relay = wired_relay(replica_frames=fr.settings([]),
                        client_settings=[(fr.SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    opening = sum(_window_updates(bytes(relay.backend_tx.data), 0))  # the preface's
    received = 0
    for _ in range(16):  # 16 x 16 KiB on the Session's stream, none of it can go on
        relay.backend.data_received(fr.frame(fr.DATA, 0, relay.bsid, bytes(16384)))
        received += 16384
    flush_dirty()
    assert relay.client.sched.queued_bytes(SESSION) == received
    assert sum(_window_updates(bytes(relay.backend_tx.data), 0)) - opening == received
    assert sum(_window_updates(bytes(relay.backend_tx.data), relay.bsid)) == 0
    relay.client.data_received(fr.window_update(SESSION, received)
                               + fr.window_update(0, received))
    flush_dirty()
    assert sum(_window_updates(bytes(relay.backend_tx.data), relay.bsid)) == received
    assert sum(_window_updates(bytes(relay.backend_tx.data), 0)) - opening == received  # once


async def test_a_read_of_many_small_frames_is_handled_in_slices_in_order() -> None:
    """3,500 PINGs in one read: 1,000 answered now with reading paused, the rest on the next
    turns of the event loop, in order, and a read that comes meanwhile waits behind them."""
    relay = _relay(True)
    before = bytes(relay.client_tx.data)
    tx = relay.client_tx
    relay.client.data_received(b"".join(fr.ping(i.to_bytes(8, "big")) for i in range(3500)))

    def acks() -> list[int]:
        return [int.from_bytes(f.payload, "big") for f in named(fr.FrameReader().feed(
            bytes(tx.data)[len(before):])) if f.type == fr.PING and f.flags & fr.FLAG_ACK]

    assert acks() == list(range(FRAMES_PER_TURN)) and not tx.reading
    relay.client.data_received(fr.ping((9999).to_bytes(8, "big")))  # arrives meanwhile
    for _ in range(4):
        await asyncio.sleep(0)  # one turn of the loop each
    assert acks() == [*range(3500), 9999] and tx.reading


async def test_nothing_more_is_read_after_goaway_even_a_waiting_slice() -> None:
    """A timer's GOAWAY between two slices of a long read: the rest is not handled."""
    relay = _relay(True)
    before = len(relay.client_tx.data)
    relay.client.data_received(b"".join(fr.ping(i.to_bytes(8, "big")) for i in range(2500)))
    relay.client.goaway(fr.ENHANCE_YOUR_CALM, "header block not finished within 10s")
    relay.client.data_received(fr.ping(b"latecome"))
    for _ in range(4):
        await asyncio.sleep(0)
    acks = [f for f in named(fr.FrameReader().feed(bytes(relay.client_tx.data)[before:]))
            if f.type == fr.PING]
    assert len(acks) == FRAMES_PER_TURN  # the first slice only
