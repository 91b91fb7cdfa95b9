"""One relayed gRPC call: a client stream and, once routed, its backend stream.

Design: the two hops meet only here. Until the call is routed, DATA from the client is held
(payload slices, credit withheld, so a slow placement back-pressures only this stream). Each
half of each hop has a "done" flag; a stream id is released on its connection when both of its
halves are done, and the whole call is forgotten when both hops are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.buildkit.wire import CallClass
from gateway.h2.flow import Chunk
from gateway.h2.headers import Headers

if TYPE_CHECKING:
    from gateway.relay.backend import BackendConn
    from gateway.relay.client import ClientConn


class Call:
    __slots__ = (
        "answer",
        "authority",
        "b_in_done",
        "b_out_done",
        "backend",
        "bsid",
        "build",
        "c_in_done",
        "c_out_done",
        "capture",
        "client",
        "csid",
        "drop_resp_headers",
        "first_decoded",
        "first_size",
        "headers",
        "held",
        "held_bytes",
        "held_payload",
        "klass",
        "path",
        "replica",
        "resp_headers_sent",
        "rst_after_end",
        "solve_ref",
        "status",
        "vertex",
        "vertex_ref",
        "waiting",
    )

    def __init__(self, client: ClientConn, csid: int, headers: Headers, path: str,
                 authority: str, klass: CallClass) -> None:
        self.client = client
        self.csid = csid
        self.headers = headers
        self.path = path
        self.authority = authority
        self.klass = klass
        self.backend: BackendConn | None = None
        self.bsid = 0
        self.replica: str | None = None
        self.build: tuple[str, str] | None = None  # (ref, replica) of a placed Solve
        self.held: list[tuple[Chunk, bool, int]] | None = []  # (payload, end, flow_len)
        self.held_bytes = 0  # flow-controlled bytes held (credit owed to the client)
        self.held_payload = 0  # payload bytes held
        self.first_size = 5  # bytes the first request message needs (prefix, then 5 + size)
        self.waiting = True  # no routing decision yet
        self.c_in_done = False  # client sent END_STREAM or the stream was reset
        self.c_out_done = False  # END_STREAM or RST_STREAM written to the client
        self.b_in_done = False
        self.b_out_done = False
        self.resp_headers_sent = False
        self.rst_after_end = False  # backend reset NO_ERROR after its trailers
        self.status: int | None = None  # grpc-status seen in the backend's trailers
        self.vertex: tuple[str, int, str] | None = None  # wait vertex: (digest, start ns, label)
        self.drop_resp_headers = False  # the gateway already sent response headers itself
        self.capture: list[bytes] | None = None  # response DATA kept (LLBBridge Pong cache)
        self.first_decoded = False  # the first request message was read for routing
        self.solve_ref = ""  # a Solve's Ref, once decoded
        self.vertex_ref = ""  # the Ref whose wait this Status call shows
        self.answer: bytes | None = None  # the cached answer sent once the request has ended

    def held_message(self, limit: int | None = None) -> bytes:
        """The bytes held so far, or their first `limit` (to decode the first message)."""
        data = b"".join(bytes(p) for p, _e, _n in self.held or ())
        return data if limit is None else data[:limit]
