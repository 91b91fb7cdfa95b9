"""List-then-watch of one pool's pods, written into the registry.

Design: list the pods (by the pool's selector: `--kube-selector`, else the Deployment's own,
read from its scale subresource), then watch from the list's resourceVersion with bookmarks,
each watch bounded (`WATCH_SECONDS` on the server, a read timeout past that on the client, so
a silent network partition is noticed), resuming from the last resourceVersion seen. A 410
(Gone) means the resourceVersion is too old: list again. Errors back off exponentially
(`KubeSettings.backoff` .. `backoff_max`) and mark the API unreachable; meanwhile the registry
keeps the pods last seen, so builds keep flowing to them.

After every change the pool's members go to `Registry.sync_pool` (pods with an IP and a
resolved port; Ready and terminating as the pod says) and `on_change` is called, collapsed by
the caller. Invariant: `pods` is exactly the API's view as of `resource_version`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any, cast

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from gateway.config import KubeSettings, KubeWorkload
from gateway.discovery.kube import API_ERRORS, Gone, Kube, json_body, read_scale
from gateway.discovery.pods import PodView, pod_view
from gateway.metrics import Metrics
from gateway.replicas.registry import Registry

log = logging.getLogger("gateway.discovery")

WATCH_SECONDS = 60
"""How long one watch request lasts on the server before it is renewed (jittered)."""
READ_TIMEOUT = 30.0
"""Silence past the watch's own end after which the connection counts as lost: a silent
network partition is noticed within about WATCH_SECONDS + READ_TIMEOUT."""
SHORT_WATCH = 1.0
"""A watch that ends sooner than this is retried after a backoff, not at once."""


class PodWatch:
    def __init__(self, *, pool: str, workload: KubeWorkload, kube: Kube, registry: Registry,
                 settings: KubeSettings, metrics: Metrics,
                 on_change: Callable[[], None]) -> None:
        self.pool = pool
        self.workload = workload
        self.namespace = workload.namespace or kube.namespace
        self.kube = kube
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.on_change = on_change
        self.pods: dict[str, PodView] = {}
        self.resource_version = ""
        self.selector = workload.selector
        self.synced = asyncio.Event()  # set once the first list has been applied
        self._core = client.CoreV1Api(kube.api)
        self._unresolved: set[str] = set()  # pods whose named port is missing (logged once)

    async def run(self) -> None:
        backoff = self.settings.backoff
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                if not self.selector:
                    self.selector = await self._workload_selector()
                if not self.resource_version:
                    await self._list()
                await self._watch()
                self.metrics.watch_restarts.labels(self.pool, "expired").inc()
            except Gone:
                log.info("pod watch too old; listing again", extra={"pool": self.pool})
                self.metrics.watch_restarts.labels(self.pool, "gone").inc()
                self.resource_version = ""
            except API_ERRORS as exc:
                self.kube.health.failed("watch pods", exc)
                self.metrics.watch_restarts.labels(self.pool, "error").inc()
            except Exception as exc:  # a bad event must not end discovery for good
                log.error("pod watch failed unexpectedly; listing again",
                          extra={"pool": self.pool, "error": repr(exc)})
                self.kube.health.failed("watch pods", exc)
                self.metrics.watch_restarts.labels(self.pool, "error").inc()
                self.resource_version = ""
            if loop.time() - started >= SHORT_WATCH and self.kube.health.up:
                backoff = self.settings.backoff  # a watch that ran: start over
                continue
            await asyncio.sleep(backoff)  # failing, or ending at once: never a hot loop
            backoff = min(backoff * 2, self.settings.backoff_max)

    async def _workload_selector(self) -> str:
        """The workload's pod selector, from its scale subresource (what the Role allows)."""
        scale = await read_scale(client.AppsV1Api(self.kube.api), self.workload,
                                 self.namespace)
        selector = str(scale.status.selector or "")
        if not selector:
            raise ValueError(f"{self.workload.kind} {self.namespace}/{self.workload.name} has "
                             "no selector")
        return selector

    async def _list(self) -> None:
        response = cast(aiohttp.ClientResponse, await self._core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=READ_TIMEOUT)))
        body = await json_body(response)
        self.kube.health.succeeded()
        self.pods = {}
        self._unresolved.clear()
        for obj in body.get("items") or ():
            self._store(pod_view(obj, self.workload.port))
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion", ""))
        self._publish()
        self.synced.set()
        log.info("pods listed", extra={"pool": self.pool, "namespace": self.namespace,
                                       "selector": self.selector, "pods": len(self.pods)})

    async def _watch(self) -> None:
        seconds = WATCH_SECONDS + random.randint(0, WATCH_SECONDS // 4)
        response = cast(aiohttp.ClientResponse, await self._core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, watch=True,
            resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=seconds, _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(sock_connect=READ_TIMEOUT,
                                                   sock_read=seconds + READ_TIMEOUT)))
        if response.status == 410:
            response.release()
            raise Gone()
        if response.status != 200:
            await json_body(response)  # raises with the API's message (and releases)
        try:
            self.kube.health.succeeded()
            async for line in response.content:
                if line.strip():
                    self._event(json.loads(line))
        finally:
            response.release()

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ApiException(status=obj.get("code", 0), reason=obj.get("message", ""))
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind != "BOOKMARK":
            view = pod_view(obj, self.workload.port)
            if kind == "DELETED":
                self.pods.pop(view.name, None)
                self._unresolved.discard(view.name)
            elif kind in ("ADDED", "MODIFIED"):
                self._store(view)
            self._publish()
        if version:  # only once the event is applied: a watch resumes after it
            self.resource_version = version

    def _store(self, view: PodView) -> None:
        self.pods[view.name] = view
        if view.ip and view.port is None and view.name not in self._unresolved:
            self._unresolved.add(view.name)
            log.warning("pod has no such port; not a replica",
                        extra={"pool": self.pool, "pod": view.name,
                               "port": self.workload.port})

    def _publish(self) -> None:
        members = (p.replica(self.pool) for p in self.pods.values())
        self.registry.sync_pool(self.pool, (r for r in members if r is not None))
        self.on_change()
