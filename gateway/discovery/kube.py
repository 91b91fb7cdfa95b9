"""The Kubernetes API connection the gateway shares: client, namespace, and whether it answers.

Design: one `kubernetes_asyncio` ApiClient for every watch and every write (one aiohttp
connection pool), configured from `--kubeconfig`/`--kube-context`, else the in-cluster service
account, else ~/.kube/config. `ApiHealth` is what the gateway knows of the API's reachability:
every caller reports each outcome; the transitions are logged once each (an outage is one
warning, not one per retry), counted in metrics and shown in /api/status. While the API is down
the gateway keeps what it last saw: routing goes on to the pods it knows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from gateway.config import KubeSettings, KubeWorkload
from gateway.metrics import Metrics

log = logging.getLogger("gateway.kube")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
API_ERRORS = (ApiException, aiohttp.ClientError, OSError, TimeoutError, ValueError)
"""What a call to an API that is down, overloaded or refusing raises."""


async def read_scale(apps: client.AppsV1Api, workload: KubeWorkload,
                     namespace: str) -> client.V1Scale:
    """The scale subresource of a pool's Deployment or StatefulSet: its count and selector
    (the one read the Role allows on the workload)."""
    if workload.statefulset:
        return await apps.read_namespaced_stateful_set_scale(workload.statefulset, namespace)
    return await apps.read_namespaced_deployment_scale(workload.deployment, namespace)


async def patch_scale(apps: client.AppsV1Api, workload: KubeWorkload, namespace: str,
                      replicas: int) -> None:
    """Sets the count of a pool's Deployment or StatefulSet."""
    body = {"spec": {"replicas": replicas}}
    if workload.statefulset:
        await apps.patch_namespaced_stateful_set_scale(workload.statefulset, namespace, body)
    else:
        await apps.patch_namespaced_deployment_scale(workload.deployment, namespace, body)


class Gone(Exception):
    """410: the resourceVersion a watch resumes from is too old; list again."""


class ApiHealth:
    """Whether the Kubernetes API answered the last call, and since when (loop time)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.up = True
        self.since = 0.0
        self.error = ""
        metrics.kube_api_up.set(1)

    def succeeded(self) -> None:
        if not self.up:
            log.info("kubernetes api calls succeeding again",
                     extra={"down_s": round(_now() - self.since, 3)})
            self.up, self.since, self.error = True, _now(), ""
            self.metrics.kube_api_up.set(1)

    def failed(self, operation: str, exc: BaseException) -> None:
        error = describe(exc)
        self.metrics.kube_api_errors.labels(operation).inc()
        if self.up:
            log.warning("kubernetes api calls failing; routing to the pods known",
                        extra={"operation": operation, "error": error})
            self.up, self.since = False, _now()
            self.metrics.kube_api_up.set(0)
        self.error = f"{operation}: {error}"

    def document(self, now: float) -> dict[str, Any]:
        return {"api": "ok" if self.up else "unreachable",
                "for_s": round(now - self.since, 3) if self.since else None,
                "error": self.error}


def _now() -> float:
    return asyncio.get_running_loop().time()


def describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status}: {exc.reason}"
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class Kube:
    api: client.ApiClient
    namespace: str  # the default namespace of pools that name none
    health: ApiHealth

    async def close(self) -> None:
        await self.api.close()


async def connect(settings: KubeSettings, metrics: Metrics) -> Kube:
    """A client for the configured cluster; raises ConfigException if none is configured."""
    namespace = ""
    if settings.kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        path = settings.kubeconfig or None
        api = await config.new_client_from_config(config_file=path,
                                                  context=settings.context or None)
        contexts, current = config.list_kube_config_contexts(path)
        chosen = next((c for c in contexts if c["name"] == settings.context), current) \
            if settings.context else current
        namespace = ((chosen or {}).get("context") or {}).get("namespace") or ""
    else:
        configuration = client.Configuration()
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration)
        api = client.ApiClient(configuration)
        namespace = _own_namespace()
    return Kube(api, namespace or "default", ApiHealth(metrics))


def _own_namespace() -> str:
    """The gateway pod's namespace (read once at start-up, a small local file)."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


async def json_body(response: aiohttp.ClientResponse) -> Mapping[str, Any]:
    """The decoded body of a raw (`_preload_content=False`) response; ApiException if not 2xx."""
    try:
        body = await response.read()
    finally:
        response.release()
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=_reason(body, response.reason))
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("the Kubernetes API answered with something other than an object")
    return data


def _reason(body: bytes, fallback: str | None) -> str:
    try:
        return str(json.loads(body).get("message") or fallback)
    except (ValueError, AttributeError):
        return fallback or ""
