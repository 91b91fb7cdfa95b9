"""The admin HTTP server (aiohttp): metrics, probes and the status page.

Routes: /metrics (Prometheus text format), /healthz (the process answers), /readyz (200 while
serving with at least one ready replica and not draining, else 503), /api/status (the JSON
document of admin/status.py), /status (a self-contained HTML page that renders /api/status
and refreshes itself; no external assets). Read-only: nothing here changes the gateway.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.admin import status

if TYPE_CHECKING:
    from gateway.relay.hub import Hub


class AdminServer:
    def __init__(self, hub: Hub, registry: CollectorRegistry, *, version: str,
                 extra: Callable[[float], dict[str, Any]] = lambda now: {}) -> None:
        self.hub = hub
        self.extra = extra  # Kubernetes and scaling state, by the composition root
        self.registry = registry
        self.version = version
        self.started = time.time()
        self._page = resources.files("gateway.admin").joinpath("status.html").read_bytes()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/status", self.page)
        app.router.add_get("/", self.page)
        return app

    async def start(self, host: str, port: int) -> None:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        server = site._server  # the bound port, for port 0
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.hub.ready():
            return web.Response(text="ready\n")
        reason = "draining" if self.hub.draining else "no ready replica"
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def api_status(self, request: web.Request) -> web.Response:
        now = self.hub.now()
        doc = status.document(self.hub, version=self.version, started=self.started,
                              now=now, wall=time.time(), extra=self.extra(now))
        return web.Response(text=json.dumps(doc, indent=1), content_type="application/json")

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")
