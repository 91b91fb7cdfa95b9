"""TLS and mTLS on the listener, with a throw-away CA (trustme).

Both kinds of BuildKit client: buildctl offers ALPN h2 (and refuses a server that selects none),
the buildx remote driver offers no ALPN at all (buildkit-wire.md, "TLS").
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

from gateway.app import Gateway
from gateway.h2 import frames as fr
from gateway.relay.client import ClientConn
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.h2_transport import H2Transport
from tests.fakes.ids import node_id
from tests.fakes.replica import BUILD_SECONDS, FakeReplica
from tests.integration.clients import client


@dataclass
class Pki:
    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert
    dir: Path

    def gateway_args(self) -> tuple[str, ...]:
        return ("--tlscert", str(self.dir / "server.pem"), "--tlskey",
                str(self.dir / "server.key"), "--tlscacert", str(self.dir / "ca.pem"))

    def write_server(self, cert: trustme.LeafCert) -> None:
        cert.cert_chain_pems[0].write_to_path(str(self.dir / "server.pem"))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(self.dir / "server.pem"), append=True)
        cert.private_key_pem.write_to_path(str(self.dir / "server.key"))


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    pki = Pki(ca, ca.issue_cert("127.0.0.1", "localhost"),
              ca.issue_cert("ci-runner-7.builders.example", common_name="ci-runner-7"), tmp_path)
    pki.write_server(pki.server)
    yield pki


def client_tls(pki: Pki, *, cert: trustme.LeafCert | None = None,
               alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    pki.ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


async def build_over(gw: Gateway, tls: ssl.SSLContext, **kw: object
                     ) -> tuple[buildflow.BuildOutcome, str | None, bytes]:
    """A build over TLS: its outcome, the ALPN selected, the server's certificate."""
    t = await H2Transport.connect("127.0.0.1", gateway_port(gw), tls=tls)
    try:
        ssl_object = t.extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        out = await buildflow.build(t, context_dir="/src/tls", node_id=node_id(), **kw)
        return out, ssl_object.selected_alpn_protocol(), ssl_object.getpeercert(True)
    finally:
        await t.close()


async def test_a_client_offering_no_alpn_builds_and_is_named_by_its_certificate(
        pki: Pki) -> None:
    """The buildx remote driver: TLS in its own dialer, no ALPN, then HTTP/2."""
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], *pki.gateway_args()) as gw:
        assert gw.hub is not None
        seen: list[str] = []
        opened = gw.hub.client_opened

        def client_opened(conn: object) -> None:
            seen.append(conn.identity)  # type: ignore[attr-defined]
            opened(conn)  # type: ignore[arg-type]

        gw.hub.client_opened = client_opened  # type: ignore[method-assign]
        out, alpn, _cert = await build_over(gw, client_tls(pki, cert=pki.client))
        counted = gw.metrics.tenant_builds.labels(
            "default", "ci-runner-7.builders.example")._value.get()
    assert out.ok, out.error
    assert alpn is None
    assert seen == ["ci-runner-7.builders.example"]
    assert counted == 1  # the identity in the metrics too


async def test_a_client_offering_h2_gets_h2_selected(pki: Pki) -> None:
    """buildctl (grpc-go >= 1.67) refuses a server that selects no ALPN."""
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], *pki.gateway_args()) as gw:
        out, alpn, _cert = await build_over(gw, client_tls(pki, cert=pki.client,
                                                           alpn=["h2"]))
    assert out.ok, out.error
    assert alpn == "h2"


async def refused(gw: Gateway, tls: ssl.SSLContext) -> str:
    """The TLS error a client gets from the gateway. In TLS 1.3 the server checks the client's
    certificate after the client's side of the handshake is done, so the alert shows at the
    first read (as it does for buildctl and buildx)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port(gw), ssl=tls,
                                                   server_hostname="127.0.0.1")
    try:
        writer.write(fr.PREFACE + fr.settings([]))
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass
    except ssl.SSLError as exc:
        return str(exc.reason)
    finally:
        writer.close()
    return "no TLS error"


async def test_clients_without_a_good_certificate_get_a_clear_tls_alert(pki: Pki) -> None:
    stranger = trustme.CA().issue_cert("intruder.example")
    expired = pki.ca.issue_cert(
        "old-runner.example", not_before=datetime.datetime(2020, 1, 1),
        not_after=datetime.datetime(2021, 1, 1))
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], *pki.gateway_args()) as gw:
        assert gw.hub is not None
        assert await refused(gw, client_tls(pki)) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
        assert await refused(gw, client_tls(pki, cert=stranger)) == "TLSV1_ALERT_UNKNOWN_CA"
        assert await refused(gw, client_tls(pki, cert=expired)) == \
            "SSLV3_ALERT_CERTIFICATE_EXPIRED"
        assert not gw.hub.clients
        counted = {reason: gw.prometheus.get_sample_value(
            "buildkit_gateway_tls_handshakes_refused_total", {"reason": reason})
            for reason in ("no_certificate", "untrusted_certificate", "expired_certificate")}
        assert counted == dict.fromkeys(counted, 1.0)
        out, _alpn, _cert = await build_over(gw, client_tls(pki, cert=pki.client))
    assert out.ok, out.error  # the gateway goes on serving good clients


async def test_refused_handshakes_leave_nothing_for_the_cyclic_gc(pki: Pki) -> None:
    """A client refused during the TLS handshake never gets a connected ClientConn: the one
    made for it is freed by reference counting alone, with the cyclic GC off."""
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], *pki.gateway_args()) as gw:
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                assert await refused(gw, client_tls(pki)) == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
            alive = [o for o in gc.get_objects() if isinstance(o, ClientConn)]
        finally:
            gc.enable()
    assert alive == []


async def test_certificates_rotate_without_dropping_a_running_build(pki: Pki) -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], *pki.gateway_args()) as gw:
        assert gw.tls is not None
        reloaded = gw.tls.reloaded
        running = asyncio.create_task(build_over(
            gw, client_tls(pki, cert=pki.client), frontend_attrs={BUILD_SECONDS: "3"}))
        await replica.wait_for(lambda: bool(replica.active_builds()), 10)
        pki.write_server(pki.ca.issue_cert("127.0.0.1", "localhost"))  # the new certificate
        async with asyncio.timeout(10):
            await reloaded.wait()
        out, _alpn, old_cert = await running
        new_out, _alpn, new_cert = await build_over(gw, client_tls(pki, cert=pki.client))
    assert out.ok, out.error  # the build on the old certificate finished
    assert new_out.ok, new_out.error
    assert new_cert != old_cert


async def test_tls_files_that_do_not_load_stop_the_start_with_a_clear_error(
        tmp_path: Path) -> None:
    from gateway.config import ConfigError

    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot load the listener's TLS files"):
        async with running_replicas(1) as (replica,), running_gateway(
                [replica.address], "--tlscert", str(tmp_path / "junk.pem"),
                "--tlskey", str(tmp_path / "junk.pem")):
            pass


def replica_tls(pki: Pki, *, client_auth: bool) -> grpc.ServerCredentials:
    """buildkitd --tlscert/--tlskey[/--tlscacert]: the replica's own certificate, and the
    gateway's client certificate required when `client_auth`."""
    cert = pki.ca.issue_cert("buildkitd.builders.example")
    return grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())],
        root_certificates=pki.ca.cert_pem.bytes(), require_client_auth=client_auth)


async def test_the_gateway_speaks_tls_to_replicas_that_require_it(pki: Pki) -> None:
    """Relay, probes and the cached answers all over TLS, with the gateway's client
    certificate, to a replica whose certificate names another host (--replica-servername)."""
    gateway_cert = pki.ca.issue_cert("gateway.builders.example")
    gateway_cert.private_key_and_cert_chain_pem.write_to_path(str(pki.dir / "gw-client.pem"))
    replica = FakeReplica("tls0")
    await replica.start(tls=replica_tls(pki, client_auth=True))
    try:
        async with running_gateway(
                [replica.address], "--replica-tlscacert", str(pki.dir / "ca.pem"),
                "--replica-tlscert", str(pki.dir / "gw-client.pem"),
                "--replica-tlskey", str(pki.dir / "gw-client.pem"),
                "--replica-servername", "buildkitd.builders.example") as gw:
            assert gw.registry.snapshot.replicas[0].ready  # the probes got through
            async with client("grpc-go", gateway_port(gw)) as t:
                out = await buildflow.build(t, context_dir="/src", node_id=node_id(),
                                            upload=1 << 20)
    finally:
        await replica.stop(grace=0)
    assert out.ok, out.error
    assert out.replica == "tls0"


async def test_a_replica_that_requires_a_client_certificate_refuses_a_gateway_without(
        pki: Pki) -> None:
    replica = FakeReplica("tls1")
    await replica.start(tls=replica_tls(pki, client_auth=True))
    try:
        async with running_gateway(
                [replica.address], "--replica-tlscacert", str(pki.dir / "ca.pem"),
                "--replica-servername", "buildkitd.builders.example") as gw:
            state = gw.registry.snapshot.replicas[0]
    finally:
        await replica.stop(grace=0)
    assert not state.ready and "UNAVAILABLE" in state.reason  # said, not silently skipped


async def test_a_client_that_never_finishes_the_tls_handshake_is_closed_and_counted(
        pki: Pki) -> None:
    async with running_replicas(1) as (replica,), running_gateway(
            [replica.address], *pki.gateway_args(), "--handshake-timeout", "0.5") as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway_port(gw))
        writer.write(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # closed by the gateway
        writer.close()
        assert gw.prometheus.get_sample_value(
            "buildkit_gateway_tls_handshakes_refused_total", {"reason": "timeout"}) == 1.0
