"""gateway/relay/conn.py: DATA frames reach the subclass in wire order, runs or not."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config
from gateway.h2 import frames as fr
from gateway.relay.conn import H2Conn

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
