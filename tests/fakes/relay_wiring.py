"""The relay without sockets: a client connection and a replica connection of the real relay,
wired to transports that record what they are given, with a build's Session routed through.

Used where the relay's DATA path is driven frame by frame with no peers: unit tests that compare
ways of handling it, and bench/relay_micro.py. Needs a running event loop (the hub takes it).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from gateway import config
from gateway.builds.ledger import Ledger
from gateway.h2 import frames as fr
from gateway.h2.headers import HeaderEncoder
from gateway.metrics import Metrics
from gateway.relay.backend import BackendConn, Upstream
from gateway.relay.client import ClientConn
from gateway.relay.conn import flush_dirty
from gateway.relay.hub import Hub
from gateway.replicas.registry import Registry, Replica

SESSION = 3  # the client's Session stream; stream 1 is its Solve


class RecordingTransport:
    """Keeps what is written (or only counts it: `keep=False`)."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.data = bytearray()
        self.bytes = 0
        self.reading = True

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.keep:
            self.data += data

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 5555) if name == "peername" else None

    def close(self) -> None:
        pass


@dataclass
class WiredRelay:
    client: ClientConn
    backend: BackendConn
    client_tx: RecordingTransport  # what the gateway sent the client
    backend_tx: RecordingTransport  # what it sent the replica, after the connection preface
    bsid: int  # the Session's stream on the replica connection


def wired_hub() -> tuple[Hub, Upstream]:
    """A hub over one ready replica "r" whose upstream is in place (not yet connected)."""
    settings = config.load(["--replica", "tcp://127.0.0.1:9"], {})
    registry = Registry([Replica("r", "tcp://127.0.0.1:9", ready=True, reason="")])
    hub = Hub(relay=settings.relay, routing=settings.routing, pools=settings.pools,
              registry=registry, ledger=Ledger(),
              control=config.Endpoint("unix", path="/nonexistent"),
              spawn=lambda coro, name: coro.close(),
              metrics=Metrics(CollectorRegistry(), version="test"),
              eject=lambda replica, reason: None)
    upstream = Upstream(hub, "r", config.parse_endpoint("tcp://127.0.0.1:9"), settings.relay)
    hub.upstreams["r"] = upstream
    return hub, upstream


def wired_relay(*, replica_frames: bytes, client_settings: list[tuple[int, int]],
                client_cls: type[ClientConn] = ClientConn,
                backend_cls: type[BackendConn] = BackendConn, keep: bool = True) -> WiredRelay:
    """A Solve and its Session from one client, routed to one replica connection.

    `replica_frames` is what the replica says first (its SETTINGS, window updates); the replica
    has answered the Session's headers by the time this returns.
    """
    hub, upstream = wired_hub()
    backend = backend_cls(upstream)
    backend_tx = RecordingTransport(keep=keep)
    backend.connection_made(backend_tx)
    backend.data_received(replica_frames)
    client = client_cls(hub, listener="test")
    client_tx = RecordingTransport(keep=keep)
    client.connection_made(client_tx)
    client.data_received(fr.PREFACE + fr.settings(client_settings))
    solve = b"\x0a\x03ref\x2a\x03sid"  # SolveRequest{Ref: "ref", Session: "sid"}
    headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"gw"),
               (b"content-type", b"application/grpc")]
    encode = HeaderEncoder().encode  # the client's blocks, in the order they are sent
    client.data_received(
        fr.header_block(1, encode([*headers, (b":path", b"/moby.buildkit.v1.Control/Solve")]),
                        end_stream=False, max_frame=16384)
        + fr.frame(fr.DATA, fr.FLAG_END_STREAM, 1,
                   b"\x00" + len(solve).to_bytes(4, "big") + solve)
        + fr.header_block(SESSION,
                          encode([*headers, (b":path", b"/moby.buildkit.v1.Control/Session"),
                                  (b"x-docker-expose-session-uuid", b"sid"),
                                  (b"x-docker-expose-session-sharedkey", b"")]),
                          end_stream=False, max_frame=16384))
    upstream.connected(backend)
    call = client.calls[SESSION]
    assert call.backend is backend, "session not routed"
    backend.data_received(fr.header_block(
        call.bsid, HeaderEncoder().encode([(b":status", b"200"),
                                           (b"content-type", b"application/grpc")]),
        end_stream=False, max_frame=16384))
    flush_dirty()
    del backend_tx.data[:len(fr.PREFACE)]
    return WiredRelay(client, backend, client_tx, backend_tx, call.bsid)
