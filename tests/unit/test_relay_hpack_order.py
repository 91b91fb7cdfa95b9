"""Toward a client, every header block the relay writes decodes with a strict HPACK decoder.

The relay's real client and replica connections, driven at random: calls open, the replica
answers with headers, data, trailers (error messages of varying length) or a reset (the relay's
own error trailers, written past the stream's dropped queue), the client moves its windows
(down to 0), lowers and raises its SETTINGS_HEADER_TABLE_SIZE, resets streams, and the replica
connection is lost midway. hpack's decoder reads what the client receives in order, applying
each lowered table size when the gateway's SETTINGS ACK arrives, as RFC 9113 has it; it raises
on a block decoded against the wrong table or on a missing size update.
"""

from __future__ import annotations

import random

import hpack

from gateway.h2 import frames as fr
from gateway.h2.headers import HeaderEncoder
from gateway.relay.backend import BackendConn
from gateway.relay.client import ClientConn
from gateway.relay.conn import flush_dirty
from tests.fakes.relay_wiring import RecordingTransport, wired_hub

SEEDS = 150
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"gw"),
           (b":path", b"/x.Y/Z"), (b"content-type", b"application/grpc")]
WINDOWS = [0, 8, 100, 20000]


def run(seed: int) -> int:
    """One random run; returns the header blocks the client decoded."""
    rnd = random.Random(seed)
    hub, upstream = wired_hub()
    backend = BackendConn(upstream)
    backend.connection_made(RecordingTransport(keep=False))
    backend.data_received(fr.settings([]) + fr.window_update(0, 1 << 30))
    client = ClientConn(hub, listener="test")
    received = RecordingTransport()
    client.connection_made(received)
    request_encoder, replica_encoder = HeaderEncoder(), hpack.Encoder()
    unacked: list[int | None] = []  # table sizes of the client's SETTINGS not yet acknowledged

    def settings(values: list[tuple[int, int]]) -> None:
        unacked.append(dict(values).get(fr.SETTINGS_HEADER_TABLE_SIZE))
        client.data_received(fr.settings(values))

    client.data_received(fr.PREFACE)
    settings([(fr.SETTINGS_INITIAL_WINDOW_SIZE, rnd.choice(WINDOWS))])
    decoder, reader = hpack.Decoder(), fr.FrameReader()
    read = decoded = 0
    block: bytes | None = None

    def absorb() -> None:
        nonlocal read, decoded, block
        data, read = bytes(received.data[read:]), len(received.data)
        for ftype, flags, _sid, payload, _n in reader.feed(data):
            if ftype == fr.SETTINGS and flags & fr.FLAG_ACK:
                size = unacked.pop(0)
                if size is not None:
                    decoder.max_allowed_table_size = min(decoder.max_allowed_table_size, size)
            elif ftype in (fr.HEADERS, fr.CONTINUATION):
                block = (block or b"") + bytes(payload)
                if flags & fr.FLAG_END_HEADERS:
                    decoder.decode(block, raw=True)  # raises on any disorder
                    decoded += 1
                    block = None
            else:
                assert block is None, "a frame inside a header block"

    open_sids: list[int] = []
    next_sid = 1
    for step in range(400):
        op = rnd.random()
        if op < 0.2 and len(open_sids) < 50:
            client.data_received(
                fr.header_block(next_sid, request_encoder.encode(REQUEST), end_stream=False,
                                max_frame=16384)
                + fr.frame(fr.DATA, fr.FLAG_END_STREAM, next_sid, b""))
            open_sids.append(next_sid)
            next_sid += 2
        elif op < 0.55 and open_sids:
            csid = rnd.choice(open_sids)
            call = client.calls.get(csid)
            if call is None or call.backend is None or call.b_in_done or backend.closed:
                open_sids.remove(csid)
                continue
            bsid, r = call.bsid, rnd.random()
            if not call.resp_headers_sent:
                backend.data_received(fr.header_block(bsid, replica_encoder.encode([
                    (b":status", b"200"), (b"content-type", b"application/grpc"),
                    (b"x-v", str(rnd.randrange(50)).encode())]), end_stream=False,
                    max_frame=16384))
            elif r < 0.5:
                backend.data_received(fr.frame(fr.DATA, 0, bsid, bytes(rnd.randrange(1, 300))))
            elif r < 0.8:
                backend.data_received(fr.header_block(bsid, replica_encoder.encode([
                    (b"grpc-status", b"2"), (b"grpc-message", b"m" * rnd.randrange(1, 600))]),
                    end_stream=True, max_frame=16384))
            else:  # the relay answers the client with its own error trailers
                backend.data_received(fr.rst_stream(bsid, rnd.choice([fr.CANCEL,
                                                                      fr.INTERNAL_ERROR])))
        elif op < 0.85:
            live = [s for s in open_sids if s in client.calls]
            sid = rnd.choice(live) if live and rnd.random() < 0.7 else 0
            client.data_received(fr.window_update(sid, rnd.randrange(1, 500)))
        elif op < 0.9:
            settings([(fr.SETTINGS_HEADER_TABLE_SIZE, rnd.choice([0, 50, 100, 300, 1000, 4096]))])
        elif op < 0.95:
            settings([(fr.SETTINGS_INITIAL_WINDOW_SIZE, rnd.choice(WINDOWS))])
        elif open_sids:
            sid = rnd.choice(open_sids)
            client.data_received(fr.rst_stream(sid, fr.CANCEL))
            open_sids.remove(sid)
        if step == 300:
            backend.connection_lost(None)  # every open call ends with UNAVAILABLE trailers
        flush_dirty()
        absorb()
    client.data_received(fr.window_update(0, 1 << 20))
    for sid in list(client.calls):
        client.data_received(fr.window_update(sid, 1 << 20))
    flush_dirty()
    absorb()
    return decoded


async def test_every_block_toward_the_client_decodes_in_wire_order() -> None:
    decoded = 0
    for seed in range(SEEDS):
        try:
            decoded += run(seed)
        except Exception as exc:
            raise AssertionError(f"seed {seed}: {exc!r}") from exc
    assert decoded > 5000  # the runs wrote many blocks, not a few
