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
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any

from gateway.config import ConfigError, ReplicaTlsSettings, TlsSettings

log = logging.getLogger("gateway.tls")

WATCH_EVERY = 2.0
"""Seconds between looks at the certificate files."""


class ListenerTls:
    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
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
