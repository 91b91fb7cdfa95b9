"""The relay's own answers (cached Pong, cached control answers) keep the stream's frame order:
headers, data, trailers, and only then RST_STREAM(NO_ERROR) when the request had not ended,
even when the answer waits for the client's window."""

from __future__ import annotations

import hpack

from gateway.buildkit import wire
from gateway.h2 import frames as fr
from gateway.relay.call import Call
from gateway.relay.client import ClientConn
from gateway.relay.conn import flush_dirty
from tests.fakes.frames import named
from tests.fakes.relay_wiring import RecordingTransport, wired_hub

PING = "/moby.buildkit.v1.frontend.LLBBridge/Ping"


async def test_answer_resets_an_unfinished_request_only_after_its_trailers() -> None:
    hub, _upstream = wired_hub()
    client = ClientConn(hub, listener="test")
    tx = RecordingTransport()
    client.connection_made(tx)
    client.data_received(fr.PREFACE + fr.settings([(fr.SETTINGS_INITIAL_WINDOW_SIZE, 8)]))
    call = Call(client, 1, [(b":path", PING.encode())], PING, "gw", wire.CallClass.LLB)
    client.calls[1] = call  # a Ping whose request has not ended (no END_STREAM yet)
    client.sched.open(1)
    hub.stream_opened(call)
    before = len(tx.data)
    client._answer(call, wire.frame_message(b"pong" * 10))  # 45 bytes: more than the window
    flush_dirty()
    client.data_received(fr.window_update(1, 100))
    sent = [(f.type, f.flags) for f in named(fr.FrameReader().feed(bytes(tx.data)[before:]))
            if f.stream_id == 1]
    assert sent == [
        (fr.HEADERS, fr.FLAG_END_HEADERS),
        (fr.DATA, 0),  # the 8 bytes the window allows
        (fr.DATA, 0),  # the rest, after the update
        (fr.HEADERS, fr.FLAG_END_HEADERS | fr.FLAG_END_STREAM),
        (fr.RST_STREAM, 0),
    ]
    blocks = [f.payload for f in named(fr.FrameReader().feed(bytes(tx.data)[before:]))
              if f.type == fr.HEADERS]
    decoder = hpack.Decoder()
    assert [decoder.decode(bytes(b), raw=True) for b in blocks] == [
        [(b":status", b"200"), (b"content-type", b"application/grpc")],
        [(b"grpc-status", b"0")]]
    assert 1 not in client.calls  # released once the trailers and the reset were out
