"""TLS on the client listeners, terminated by the relay (Python's `ssl` under asyncio/uvloop).

Design (buildkit-wire.md, "TLS"): buildctl offers ALPN `h2` and refuses a server that selects
none; the buildx remote driver does TLS in its own dialer and offers no ALPN at all. So the
context offers `h2` (selected when offered) and a client that offers nothing still connects.
With a CA (`--tlscacert`), client certificates are required and verified, and the client's
identity is its certificate's first DNS name, else its subject common name.

Rotation: `watch()` looks at the files' modification times every `WATCH_EVERY` seconds and
loads a changed certificate and key into the same context, so new handshakes use them while
connections already made keep theirs. A new CA file is added to the trusted ones (OpenSSL
cannot forget a CA in a live context: removing one needs a restart). A file that fails to
load is logged and the previous certificate stays.

Refusals: asyncio's (and uvloop's) server-side TLS closes a connection whose handshake failed
without sending the alert OpenSSL wrote, so a client without a good certificate saw only EOF.
The listener therefore runs its own subclass of asyncio's `SSLProtocol` over a plain TCP
transport: on a failed handshake it flushes the alert first (`certificate required`, `unknown
ca`, `certificate expired`, ...), then logs the refusal once with the peer and the reason and
counts it by a fixed reason. It relies on two methods of `asyncio.sslproto.SSLProtocol`
(`_on_handshake_complete`, `_process_outgoing`), stable since the module's 3.11 rewrite; the
TLS tests fail if that changes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from gateway.config import ConfigError, ReplicaTlsSettings, TlsSettings
from gateway.metrics import Metrics

log = logging.getLogger("gateway.tls")

WATCH_EVERY = 2.0
"""Seconds between looks at the certificate files."""


REFUSALS = ("no_certificate", "expired_certificate", "untrusted_certificate", "protocol",
            "timeout")
"""The reasons a handshake is refused (the metric's label values)."""

X509_V_ERR_CERT_HAS_EXPIRED = 10


def refusal(exc: BaseException) -> str:
    """The fixed reason for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code == X509_V_ERR_CERT_HAS_EXPIRED:
            return "expired_certificate"
        return "untrusted_certificate"
    if isinstance(exc, ssl.SSLError) and exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_certificate"
    if isinstance(exc, ConnectionAbortedError):
        return "timeout"
    return "protocol"


class _AlertingTls(sslproto.SSLProtocol):
    """Server-side TLS that sends its alert before closing on a failed handshake.

    (typeshed describes the pre-3.11 class: no waiter is valid, the timeout is a float and
    `_process_outgoing`/`_state` exist since the rewrite, hence the ignores.)"""

    def __init__(self, app: asyncio.BaseProtocol, context: ssl.SSLContext, *,
                 handshake_timeout: float, refused: Callable[[Any, BaseException], None]) -> None:
        super().__init__(asyncio.get_running_loop(), app, context,
                         None,  # type: ignore[arg-type]
                         server_side=True,
                         ssl_handshake_timeout=handshake_timeout)  # type: ignore[arg-type]
        self._refused = refused

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None and self._transport is not None:
            self._process_outgoing()  # type: ignore[attr-defined]  # the alert, which the base class's close would drop
            self._refused(self._transport.get_extra_info("peername"), handshake_exc)
        super()._on_handshake_complete(handshake_exc)

    def _check_handshake_timeout(self) -> None:
        if (self._state == sslproto.SSLProtocolState.DO_HANDSHAKE  # type: ignore[attr-defined]
                and self._transport is not None):
            self._refused(self._transport.get_extra_info("peername"),
                          ConnectionAbortedError("no TLS handshake in time"))
        super()._check_handshake_timeout()


class ListenerTls:
    def __init__(self, settings: TlsSettings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["h2"])
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the listener's TLS files (--tlscert, --tlskey, "
                              f"--tlscacert): {exc}") from exc
        if settings.cacert:
            self.context.verify_mode = ssl.CERT_REQUIRED
        self._stamps = self._mtimes()
        self.reloads = 0
        self.reloaded = asyncio.Event()  # set at each reload (and replaced), for tests

    def _load(self) -> None:
        self.context.load_cert_chain(self.settings.cert, self.settings.key)
        if self.settings.cacert:
            self.context.load_verify_locations(self.settings.cacert)

    def _mtimes(self) -> tuple[float, ...]:
        paths = (self.settings.cert, self.settings.key, self.settings.cacert)
        stamps = []
        for path in paths:
            try:
                stamps.append(os.stat(path).st_mtime if path else 0.0)
            except OSError:
                stamps.append(-1.0)
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        stamps = self._mtimes()
        if stamps == self._stamps or -1.0 in stamps:
            return False
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.warning("tls files not loaded; keeping the previous ones",
                        extra={"error": str(exc)})
            return False
        self._stamps = stamps
        self.reloads += 1
        log.info("tls files reloaded", extra={"cert": self.settings.cert})
        reloaded, self.reloaded = self.reloaded, asyncio.Event()
        reloaded.set()
        return True

    def protocol(self, app: Callable[[], asyncio.BaseProtocol], *,
                 handshake_timeout: float) -> Callable[[], asyncio.BaseProtocol]:
        """A protocol factory for a plain TCP listener: TLS with this context around `app`."""
        def make() -> asyncio.BaseProtocol:
            return _AlertingTls(app(), self.context, handshake_timeout=handshake_timeout,
                                refused=self._refused)
        return make

    def _refused(self, peer: Any, exc: BaseException) -> None:
        reason = refusal(exc)
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        log.info("tls handshake refused", extra={
            "peer": address, "reason": reason,
            "error": getattr(exc, "verify_message", None) or str(exc)})
        if self.metrics is not None:
            self.metrics.tls_refused.labels(reason).inc()

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY)
            self.reload_if_changed()


def identity(ssl_object: Any) -> str:
    """A verified client certificate's identity: its first DNS name, else its common name."""
    if ssl_object is None:
        return ""
    cert = ssl_object.getpeercert()
    if not cert:
        return ""
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "URI", "email"):
            return str(value)
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def replica_context(settings: ReplicaTlsSettings) -> ssl.SSLContext:
    """The relay's TLS toward replicas: their certificates verified (against `cacert`, else the
    system's CAs), ours presented if given, ALPN `h2` offered (buildkitd selects it)."""
    try:
        context = ssl.create_default_context(cafile=settings.cacert or None)
        if settings.cert:
            context.load_cert_chain(settings.cert, settings.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS files toward replicas (--replica-tlscacert, "
                          f"--replica-tlscert, --replica-tlskey): {exc}") from exc
    context.set_alpn_protocols(["h2"])
    return context
