"""A real kube-apiserver on loopback, and a stand-in for the parts of Kubernetes it lacks.

Design
------
* The cluster is hack/kube/cluster.sh: etcd plus a genuine kube-apiserver, no controller-manager,
  scheduler or kubelet. `start_or_reuse()` reuses the one CI started (env
  BUILDKIT_GATEWAY_TEST_KUBE names its directory) or starts a private one in a temporary
  directory on free ports (`stop()` stops only a private one). `outage()` stops the apiserver
  alone (etcd keeps the data) and restarts it with the exact command line it had
  (/proc/PID/cmdline), then waits for /readyz.
* `TestController` plays the Deployment and ReplicaSet controllers and the kubelets for one
  Deployment (or, with `kind="StatefulSet"`, the StatefulSet controller with the Parallel pod
  management policy: pods `<name>-<ordinal>`, the lowest missing ordinal created, the highest
  deleted first whatever it runs, a name reused only once its old pod is gone). One
  background task lists the Deployment and its pods, watches both (JSON lines,
  `_preload_content=False`), and after every batch of events runs a reconcile pass: a loop of
  single actions, each chosen from the cache and written back into it from the API's answer:
  create a pod, delete one (graceful, in the ReplicaSet controller's order), start a created
  pod (loopback IP, the test's `start_replica`, status Running/Ready), publish the Deployment's
  status counts. A pod that gets a deletionTimestamp is finished by a per-pod "kubelet" task:
  `stop_replica`, then a delete with grace 0. Any API or watch error ends the round: the task
  backs off (0.2 s doubling to 2 s) and lists again, so an apiserver outage is survived.

Invariants
----------
* Level-triggered: every action is derived from the cache; the cache only moves forward
  (an object is replaced only by a newer resourceVersion, and a pod known to be gone (by uid)
  never comes back), and a re-list replaces it whole.
* A replica is started at most once per pod, and stopped when its pod is deleted (gracefully
  or not) or by `close()`; a pod's loopback IP is never reused within the process.
* After `await pause()` returns, the fake makes no API write and starts no replica until
  `resume()` (a `stop_replica` already under way runs on; `set_ready` and `scale`, the test's
  own actions, still work). Paused passes still advance `observed_generation`, so a test can
  tell that a change was seen and deliberately not acted on.
* Every wait is bounded; waits are on events (the controller's change notification, a pidfd),
  except /readyz, which is polled because the apiserver offers nothing to wait on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

CLUSTER_SH = Path(__file__).resolve().parents[2] / "hack" / "kube" / "cluster.sh"
REUSE_ENV = "BUILDKIT_GATEWAY_TEST_KUBE"
READY_TIMEOUT = 60.0  # apiserver start / restart until /readyz says ok
REQUEST_TIMEOUT = 10.0  # any single non-watch API call
WATCH_SECONDS = 240  # server-side watch timeout; the watch is then simply re-listed
BACKOFF_MIN, BACKOFF_MAX = 0.2, 2.0
COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
IMAGE = "moby/buildkit:test"
NODE = "node-1"

Obj = dict[str, Any]
StartReplica = Callable[[str, str, int], Awaitable[Any]]
StopReplica = Callable[[str], Awaitable[None]]


# ---------------------------------------------------------------------------------- the cluster

@dataclass(frozen=True)
class KubeCluster:
    """A running apiserver: its cluster.sh directory, secure port and kubeconfig."""

    dir: Path
    port: int
    kubeconfig: Path
    owned: bool = False  # started by this process, so stop() stops it


def start_or_reuse() -> KubeCluster:
    """The body of a session fixture: CI's cluster if it started one, else a private one.

    Skips (fails with BUILDKIT_GATEWAY_REQUIRE_TOOLS set) when there is no kube-apiserver.
    """
    reused = os.environ.get(REUSE_ENV)
    if reused:
        kubeconfig = Path(reused) / "kubeconfig"
        port = urlsplit(_kubeconfig(kubeconfig)["clusters"][0]["cluster"]["server"]).port
        assert port is not None, f"no port in the server URL of {kubeconfig}"
        return KubeCluster(Path(reused), port, kubeconfig)
    binary = _apiserver_binary()
    if not os.access(binary, os.X_OK):
        message = (f"no kube-apiserver at {binary} "
                   "(hack/kube/build.sh builds it; or set KUBE_APISERVER)")
        if os.environ.get("BUILDKIT_GATEWAY_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
    directory = Path(tempfile.mkdtemp(prefix="buildkit-gateway-kube-"))
    port = _free_port_run(3)  # apiserver, etcd client, etcd peer
    cluster = KubeCluster(directory, port, directory / "kubeconfig", owned=True)
    try:
        subprocess.run(["bash", str(CLUSTER_SH), "start", str(directory), str(port)],
                       env={**os.environ, "KUBE_APISERVER": str(binary)}, check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = f"{exc.stderr!r}\n{_tail(directory / 'apiserver.log')}"
        stop(cluster)
        raise RuntimeError(f"cluster.sh start failed: {detail}") from exc
    return cluster


def stop(cluster: KubeCluster) -> None:
    """Stop and remove a cluster that start_or_reuse() started; leave a reused one alone."""
    if not cluster.owned:
        return
    with contextlib.ExitStack() as stack:
        pidfds = []  # opened first, so a recycled pid can never be hit
        for name in ("apiserver.pid", "etcd.pid"):
            with contextlib.suppress(OSError, ValueError):
                pidfds.append(os.pidfd_open(int((cluster.dir / name).read_text())))
                stack.callback(os.close, pidfds[-1])
        subprocess.run(["bash", str(CLUSTER_SH), "stop", str(cluster.dir)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
        # cluster.sh stop gives up (set -e) if the apiserver is already gone, leaving etcd
        # running, and does not wait for etcd: make sure both are gone before removing DIR
        for pidfd in pidfds:
            if not select.select([pidfd], [], [], 10)[0]:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                select.select([pidfd], [], [], 10)
    shutil.rmtree(cluster.dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def outage(cluster: KubeCluster) -> AsyncIterator[None]:
    """Kill only the kube-apiserver (SIGKILL: its connections drop) and wait until it is gone;
    on exit restart it with the same command line and wait until /readyz says ok.

    Not SIGTERM: the apiserver then stops listening at once but keeps serving open watches
    for up to 60 s, so clients would not notice the outage (and the test would wait)."""
    pid, argv = _apiserver_process(cluster)
    await _kill(pid)
    try:
        yield
    finally:
        # `&` in a shell that exits at once: nobody's child, as cluster.sh leaves it
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", '"$@" >>"$LOG" 2>&1 </dev/null & echo $!', "bash", *argv,
            env={**os.environ, "LOG": str(cluster.dir / "apiserver.log")},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        async with asyncio.timeout(10):
            out, _ = await proc.communicate()
        (cluster.dir / "apiserver.pid").write_text(f"{int(out)}\n")
        await wait_ready(cluster)


async def wait_ready(cluster: KubeCluster, timeout: float = READY_TIMEOUT) -> None:
    """Poll /readyz (nothing to wait on) until it answers 'ok', or TimeoutError."""
    kubeconfig = _kubeconfig(cluster.kubeconfig)
    server = kubeconfig["clusters"][0]["cluster"]
    token = next(u["user"]["token"] for u in kubeconfig["users"] if u["name"] == "admin")
    tls = ssl.create_default_context(cafile=server["certificate-authority"])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{server['server']}/readyz", ssl=tls,
                                       headers={"Authorization": f"Bearer {token}"}) as resp:
                    if resp.status == 200 and await resp.text() == "ok":
                        return
            if loop.time() >= deadline:
                raise TimeoutError(f"kube-apiserver not ready within {timeout}s:\n"
                                   f"{_tail(cluster.dir / 'apiserver.log')}")
            await asyncio.sleep(0.1)  # poll pacing, not synchronisation


async def api_client(cluster: KubeCluster, context: str = "admin") -> ApiClient:
    """A client for one kubeconfig context ('admin': system:masters; 'gateway': RBAC only).
    The caller closes it."""
    return await config.new_client_from_config(config_file=str(cluster.kubeconfig),
                                               context=context)


async def new_namespace(api: ApiClient, prefix: str = "t") -> str:
    """Create a namespace with a random name and return it. Namespaces are never deleted:
    without the controller-manager their finalization would never finish."""
    name = f"{prefix}-{random.getrandbits(40):010x}"
    await _call(client.CoreV1Api(api).create_namespace, {"metadata": {"name": name}})
    return name


# kind -> (API class, method suffix, namespaced)
_RBAC_KINDS: dict[str, tuple[Callable[[ApiClient], Any], str, bool]] = {
    "ServiceAccount": (client.CoreV1Api, "namespaced_service_account", True),
    "Role": (client.RbacAuthorizationV1Api, "namespaced_role", True),
    "RoleBinding": (client.RbacAuthorizationV1Api, "namespaced_role_binding", True),
    "ClusterRole": (client.RbacAuthorizationV1Api, "cluster_role", False),
    "ClusterRoleBinding": (client.RbacAuthorizationV1Api, "cluster_role_binding", False),
}


async def apply_rbac(cluster: KubeCluster, namespace: str, yaml_text: str) -> None:
    """Create (or replace) the RBAC objects and ServiceAccounts of a multi-document YAML, as
    admin, in `namespace`: namespaced objects and ServiceAccount subjects are moved there."""
    api = await api_client(cluster)
    try:
        for doc in yaml.safe_load_all(yaml_text):
            if not doc:
                continue
            if doc["kind"] not in _RBAC_KINDS:
                raise ValueError(f"apply_rbac: unsupported kind {doc['kind']!r}")
            make, suffix, namespaced = _RBAC_KINDS[doc["kind"]]
            target, scope = make(api), ((namespace,) if namespaced else ())
            if namespaced:
                doc["metadata"]["namespace"] = namespace
            for subject in doc.get("subjects") or ():
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = namespace
            name = doc["metadata"]["name"]
            try:
                await _call(getattr(target, f"create_{suffix}"), *scope, doc)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = await _call(getattr(target, f"read_{suffix}"), name, *scope)
                doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await _call(getattr(target, f"replace_{suffix}"), name, *scope, doc)
    finally:
        await api.close()


def free_port() -> int:
    """A TCP port free on every address (so on every loopback IP) at the time of the call."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------- the fake

@dataclass(frozen=True)
class PodView:
    """What the controller knows of one pod."""

    name: str
    ip: str | None
    ready: bool
    terminating: bool
    cost: int  # controller.kubernetes.io/pod-deletion-cost, 0 if absent or invalid
    created: datetime  # creationTimestamp (whole seconds)

    @classmethod
    def of(cls, pod: Obj) -> PodView:
        meta, status = pod["metadata"], pod.get("status") or {}
        try:
            cost = int((meta.get("annotations") or {}).get(COST_ANNOTATION, 0))
        except ValueError:
            cost = 0
        return cls(
            name=meta["name"], ip=status.get("podIP"),
            ready=any(c["type"] == "Ready" and c["status"] == "True"
                      for c in status.get("conditions") or ()),
            terminating=bool(meta.get("deletionTimestamp")), cost=cost,
            created=datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00")))


def deletion_order(pods: Iterable[PodView]) -> list[PodView]:
    """The ReplicaSet controller's scale-down order (ActivePods, simplified): not-ready before
    ready, then lower deletion cost, then newer creationTimestamp, then name."""
    return sorted(pods, key=lambda p: (p.ready, p.cost, -p.created.timestamp(), p.name))


def _loopback_ips() -> Iterator[str]:
    for n in itertools.count(10):
        if n & 255 not in (0, 255):
            yield f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


_IPS = _loopback_ips()  # one sequence per process: an IP is never handed out twice


class _WatchEnded(Exception):
    """The server closed a watch (its timeout, or it stopped): list again at once."""


class TestController:
    """Deployment + ReplicaSet controllers and kubelets for one Deployment (module docstring)."""

    __test__ = False  # not a pytest test class

    def __init__(self, api: ApiClient, namespace: str, name: str, *, port: int,
                 auto_ready: bool, start_replica: StartReplica,
                 stop_replica: StopReplica, kind: str = "Deployment") -> None:
        self.namespace, self.name, self.port, self.auto_ready = namespace, name, port, auto_ready
        assert kind in ("Deployment", "StatefulSet"), kind
        self.kind = kind
        self._suffix = "deployment" if kind == "Deployment" else "stateful_set"
        self._core, self._apps = client.CoreV1Api(api), client.AppsV1Api(api)
        self._start_replica, self._stop_replica = start_replica, stop_replica
        # pod -> loop.time() (time.monotonic() on the default loop, the clock of FakeReplica's
        # CallRecords) just before the status write that last made it Ready
        self.ready_at: dict[str, float] = {}
        self.deleted: list[str] = []  # pods chosen for scale-down, in order
        self.ips: dict[str, str] = {}  # pod -> its loopback IP (kept after the pod is gone)
        self.errors: list[str] = []  # API/watch errors survived (each one led to a re-list)
        self.observed_generation = 0  # Deployment generation the last pass saw (paused or not)
        self._deployment: Obj | None = None
        self._pods: dict[str, Obj] = {}
        self._gone: set[str] = set()  # uids of pods known deleted: late events are ignored
        self._running: set[str] = set()  # pods whose replica is started and not yet stopped
        self._kubelets: dict[str, asyncio.Task[None]] = {}  # pod -> its termination task
        self._synced = False
        self._paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._acting = asyncio.Lock()  # held by every action that writes
        self._changed = asyncio.Event()
        self._inbox: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self._round = 0  # list+watch round; events of older rounds are dropped
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public API

    @classmethod
    async def start(cls, api: ApiClient, namespace: str, deployment_name: str, *, port: int,
                    start_replica: StartReplica, stop_replica: StopReplica,
                    replicas: int = 0, auto_ready: bool = True,
                    kind: str = "Deployment") -> TestController:
        """Create the Deployment (or StatefulSet) and run the controller until it has listed
        it once."""
        self = cls(api, namespace, deployment_name, port=port, auto_ready=auto_ready,
                   start_replica=start_replica, stop_replica=stop_replica, kind=kind)
        labels = {"app": deployment_name}
        container = {"name": "buildkitd", "image": IMAGE,
                     "ports": [{"containerPort": port, "name": "buildkitd"}]}
        spec: Obj = {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [container]}}}
        if kind == "StatefulSet":
            spec |= {"serviceName": deployment_name, "podManagementPolicy": "Parallel"}
        await _call(getattr(self._apps, f"create_namespaced_{self._suffix}"), namespace, {
            "metadata": {"name": deployment_name, "labels": labels}, "spec": spec})
        self._task = asyncio.create_task(self._run(), name=f"TestController {self}")
        try:
            await self.wait_for(lambda c: c._synced, 30)
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop the controller and every replica it still runs; API objects stay."""
        tasks = [t for t in (self._task, *self._kubelets.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in sorted(self._running):
            try:
                async with asyncio.timeout(10):
                    await self._stop_replica(name)
            except Exception:
                log.exception("%s: stopping replica %s", self, name)
        self._running.clear()

    async def __aenter__(self) -> TestController:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def pods(self) -> dict[str, PodView]:
        """Every pod of the Deployment the controller knows, terminating ones included."""
        return {name: PodView.of(pod) for name, pod in self._pods.items()}

    def active(self) -> list[PodView]:
        """Pods not terminating, by name."""
        return sorted((v for v in self.pods.values() if not v.terminating), key=lambda v: v.name)

    @property
    def spec_replicas(self) -> int | None:
        return None if self._deployment is None else self._deployment["spec"].get("replicas", 1)

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Stop acting; returns once the action in flight, if any, has finished."""
        self._paused = True
        self._resumed.clear()
        async with asyncio.timeout(REQUEST_TIMEOUT * 2), self._acting:
            pass

    def resume(self) -> None:
        self._paused = False
        self._resumed.set()
        self._kick()

    async def scale(self, replicas: int) -> int:
        """Set the workload's spec.replicas (as this controller's client); returns the new
        metadata.generation, to compare with `observed_generation`."""
        deployment = await _call(getattr(self._apps, f"patch_namespaced_{self._suffix}"),
                                 self.name, self.namespace, {"spec": {"replicas": replicas}})
        return int(deployment["metadata"]["generation"])

    async def set_ready(self, pod_name: str, ready: bool) -> None:
        """Set the pod's Ready (and ContainersReady) condition, as a readiness probe would."""
        pod = self._pods.get(pod_name)
        if pod is not None and PodView.of(pod).ready == ready:
            return
        started = asyncio.get_running_loop().time()
        self._store(await _call(self._core.patch_namespaced_pod_status, pod_name,
                                self.namespace, {"status": {"conditions": _readiness(ready)}}))
        if ready:
            self.ready_at[pod_name] = started
        self._kick()

    async def wait_for(self, predicate: Callable[[TestController], object],
                       timeout: float) -> None:
        """Wait until predicate(self) holds, re-checked after every change, or TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            if self._task is not None and self._task.done():
                raise RuntimeError(f"{self}: controller task ended: {self._task!r}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{self}: condition {getattr(predicate, '__name__', '?')} "
                                   f"not met within {timeout}s; {self.describe()}")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    def next_change(self) -> Coroutine[Any, Any, bool]:
        """An awaitable that completes at the first change after this call (not after its first
        await, so no change is missed), for waits that combine the controller with other
        events. Unbounded by itself: await it under a timeout."""
        return self._changed.wait()

    def describe(self) -> str:
        pods = {n: (v.ip, "ready" if v.ready else "not-ready",
                    "terminating" if v.terminating else "active", v.cost)
                for n, v in sorted(self.pods.items())}
        return (f"spec.replicas={self.spec_replicas} paused={self._paused} pods={pods} "
                f"deleted={self.deleted} last errors={self.errors[-3:]}")

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    # ------------------------------------------------------------------ list + watch

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while True:
            try:
                await self._round_of_watching()
            except _WatchEnded:
                delay = BACKOFF_MIN  # list again at once
            except Exception as exc:
                if self._synced:  # the round had got going: a new trouble, a new back-off
                    delay = BACKOFF_MIN
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                log.debug("%s: %s; listing again in %.1fs", self, self.errors[-1], delay)
                self._notify()
                await asyncio.sleep(delay)  # back-off before retrying, not synchronisation
                delay = min(delay * 2, BACKOFF_MAX)

    async def _round_of_watching(self) -> None:
        """List, reconcile, then watch and reconcile after each batch of events until a watch
        ends or fails (raised)."""
        self._round += 1
        self._synced = False
        list_workloads = getattr(self._apps, f"list_namespaced_{self._suffix}")
        deployments = await _call(list_workloads, self.namespace,
                                  field_selector=f"metadata.name={self.name}")
        pods = await _call(self._core.list_namespaced_pod, self.namespace,
                           label_selector=f"app={self.name}")
        self._deployment = (deployments["items"] or [None])[0]
        self._pods = {p["metadata"]["name"]: p for p in pods["items"]
                      if p["metadata"]["uid"] not in self._gone}
        readers = [
            asyncio.create_task(self._watch(
                "deployment", list_workloads,
                deployments["metadata"]["resourceVersion"],
                field_selector=f"metadata.name={self.name}")),
            asyncio.create_task(self._watch(
                "pod", self._core.list_namespaced_pod, pods["metadata"]["resourceVersion"],
                label_selector=f"app={self.name}")),
        ]
        try:
            await self._reconcile()
            self._synced = True
            self._notify()
            while True:
                batch = [await self._inbox.get()]
                while not self._inbox.empty():
                    batch.append(self._inbox.get_nowait())
                for round_, kind, payload in batch:
                    if kind == "error" and round_ == self._round:
                        raise payload
                    if kind in ("deployment", "pod") and round_ == self._round:
                        self._apply(kind, payload)
                await self._reconcile()
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _watch(self, kind: str, list_call: Callable[..., Awaitable[Any]],
                     resource_version: str, **selector: str) -> None:
        """Feed one watch's events into the inbox; its end or failure too, as an error."""
        round_ = self._round
        try:
            resp = await list_call(self.namespace, watch=True, resource_version=resource_version,
                                   timeout_seconds=WATCH_SECONDS, _preload_content=False,
                                   _request_timeout=WATCH_SECONDS + 30, **selector)
            async with resp:
                if resp.status != 200:
                    raise ApiException(status=resp.status, reason=(await resp.text())[:300])
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["type"] == "ERROR":  # e.g. 410 Gone: resourceVersion too old
                        raise ApiException(status=event["object"].get("code", 0),
                                           reason=event["object"].get("message", ""))
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._inbox.put_nowait((round_, kind, event))
            raise _WatchEnded(kind)
        except Exception as exc:
            self._inbox.put_nowait((round_, "error", exc))

    def _apply(self, kind: str, event: Obj) -> None:
        obj = event["object"]
        if kind == "deployment":
            if event["type"] == "DELETED":
                self._deployment = None
            elif self._deployment is None or _newer(obj, self._deployment):
                self._deployment = obj
            self._notify()
        elif event["type"] == "DELETED":
            self._gone.add(obj["metadata"]["uid"])
            mine = self._pods.get(obj["metadata"]["name"])
            if mine is not None and mine["metadata"]["uid"] == obj["metadata"]["uid"]:
                self._forget(obj["metadata"]["name"])
        else:
            self._store(obj)

    def _store(self, pod: Obj) -> None:
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        mine = self._pods.get(name)
        if uid not in self._gone and (mine is None or _newer(pod, mine)):
            self._pods[name] = pod
            self._notify()

    def _forget(self, name: str) -> None:
        pod = self._pods.pop(name, None)
        if pod is not None:
            self._gone.add(pod["metadata"]["uid"])
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _kick(self) -> None:
        """Make the controller run a pass even without a watch event."""
        self._inbox.put_nowait((self._round, "kick", None))

    # ------------------------------------------------------------------ reconcile

    async def _reconcile(self) -> None:
        async with self._acting:
            while not self._paused and self._deployment is not None and await self._step():
                pass
            if self._deployment is not None:
                self.observed_generation = int(self._deployment["metadata"]["generation"])
        self._notify()

    async def _step(self) -> bool:
        """Take one action towards the desired state; False when there is none to take."""
        assert self._deployment is not None
        pods = self.pods
        for name in sorted({n for n, v in pods.items() if v.terminating}
                           | (self._running - pods.keys())):
            if name not in self._kubelets:
                self._kubelets[name] = asyncio.create_task(self._terminate(name))
        active = deletion_order(v for v in pods.values() if not v.terminating)
        want = self._deployment["spec"].get("replicas", 1)
        if self.kind == "StatefulSet":
            return await self._stateful_step(pods, active, want)
        if len(active) < want:
            await self._create_pod()
        elif len(active) > want:
            victim = active[0].name
            self._store(await _call(self._core.delete_namespaced_pod, victim, self.namespace))
            self.deleted.append(victim)
        elif pending := [v.name for v in active if v.ip is None]:
            await self._start_pod(min(pending))
        else:
            return await self._publish_status(active)
        return True

    async def _stateful_step(self, pods: dict[str, PodView], active: list[PodView],
                             want: int) -> bool:
        """The StatefulSet controller (Parallel): the highest ordinal above the count goes
        first, whatever it runs; a missing ordinal below it is created once its old pod is
        gone."""
        beyond = [v for v in active if _ordinal(v.name) >= want]
        if beyond:
            victim = max(beyond, key=lambda v: _ordinal(v.name)).name
            self._store(await _call(self._core.delete_namespaced_pod, victim, self.namespace))
            self.deleted.append(victim)
        elif missing := [i for i in range(want) if f"{self.name}-{i}" not in pods]:
            await self._create_pod(f"{self.name}-{missing[0]}")
        elif pending := [v.name for v in active if v.ip is None]:
            await self._start_pod(min(pending))
        else:
            return await self._publish_status(active)
        return True

    async def _create_pod(self, name: str = "") -> None:
        """A pod of the template: named (a StatefulSet's ordinal, with a new IP) or not."""
        assert self._deployment is not None
        template = self._deployment["spec"]["template"]
        naming = {"name": name} if name else {"generateName": f"{self.name}-"}
        self.ips.pop(name, None)
        self._store(await _call(self._core.create_namespaced_pod, self.namespace, {
            "metadata": {**naming,
                         "labels": template["metadata"].get("labels") or {},
                         "annotations": template["metadata"].get("annotations") or {}},
            "spec": {**template["spec"], "nodeName": NODE}}))

    async def _start_pod(self, name: str) -> None:
        """The kubelet's part of a start: a loopback IP, the replica, then the pod status."""
        if name not in self.ips:
            self.ips[name] = next(_IPS)
        ip = self.ips[name]
        if name not in self._running:
            await self._start_replica(name, ip, self.port)
            self._running.add(name)
        started = asyncio.get_running_loop().time()
        self._store(await _call(self._core.patch_namespaced_pod_status, name, self.namespace, {
            "status": {"phase": "Running", "hostIP": "127.0.0.1", "podIP": ip,
                       "podIPs": [{"ip": ip}], "startTime": _now(),
                       "conditions": [_condition("PodScheduled", True),
                                      _condition("Initialized", True),
                                      *_readiness(self.auto_ready)]}}))
        if self.auto_ready:
            self.ready_at[name] = started

    async def _publish_status(self, active: list[PodView]) -> bool:
        assert self._deployment is not None
        ready = sum(v.ready for v in active)
        want = self._deployment["spec"].get("replicas", 1)
        generation = self._deployment["metadata"]["generation"]
        if self.kind == "StatefulSet":  # v1.20's StatefulSetStatus has no availableReplicas
            status = {"observedGeneration": generation, "replicas": len(active),
                      "currentReplicas": len(active), "updatedReplicas": len(active),
                      "readyReplicas": ready}
        else:
            status = {"observedGeneration": generation, "replicas": len(active),
                      "updatedReplicas": len(active), "readyReplicas": ready,
                      "availableReplicas": ready, "unavailableReplicas": max(want - ready, 0)}
        current = self._deployment.get("status") or {}
        if all(current.get(k, 0) == v for k, v in status.items()):
            return False
        deployment = await _call(
            getattr(self._apps, f"patch_namespaced_{self._suffix}_status"), self.name,
            self.namespace, {"status": status})
        if _newer(deployment, self._deployment):
            self._deployment = deployment
        return True

    async def _terminate(self, name: str) -> None:
        """The kubelet's part of a deletion: stop the replica, then delete with grace 0."""
        await self._resumed.wait()
        if name in self._running:
            try:
                await self._stop_replica(name)
            except Exception as exc:
                self.errors.append(f"stop_replica {name}: {type(exc).__name__}: {exc}"[:300])
            self._running.discard(name)
        delay = BACKOFF_MIN
        while name in self._pods:
            await self._resumed.wait()
            async with self._acting:
                if self._paused or name not in self._pods:
                    continue
                uid = self._pods[name]["metadata"]["uid"]
                try:
                    # with a body, the apiserver ignores the query's gracePeriodSeconds
                    await _call(self._core.delete_namespaced_pod, name, self.namespace, body={
                        "gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
                    self._forget(name)
                    break
                except ApiException as exc:
                    if exc.status == 404:
                        self._forget(name)
                        break
                    self.errors.append(f"delete {name}: {exc.status} {exc.reason}"[:300])
                except Exception as exc:
                    self.errors.append(f"delete {name}: {type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(delay)  # back-off before retrying, not synchronisation
            delay = min(delay * 2, BACKOFF_MAX)
        self._kubelets.pop(name, None)  # a StatefulSet reuses the name
        self._kick()


# ---------------------------------------------------------------------------------- helpers

async def _call(method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Obj:
    """One API call, answered as plain JSON; ApiException for any non-2xx status."""
    resp = await method(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
    async with resp:
        body = await resp.read()
    if not 200 <= resp.status <= 299:
        raise ApiException(status=resp.status, reason=body.decode(errors="replace")[:300])
    result: Obj = json.loads(body)
    return result


def _ordinal(name: str) -> int:
    return int(name.rpartition("-")[2])


def _newer(a: Obj, b: Obj) -> bool:
    return int(a["metadata"]["resourceVersion"]) > int(b["metadata"]["resourceVersion"])


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, value: bool) -> Obj:
    return {"type": kind, "status": "True" if value else "False", "lastTransitionTime": _now()}


def _readiness(ready: bool) -> list[Obj]:
    return [_condition("ContainersReady", ready), _condition("Ready", ready)]


def _kubeconfig(path: Path) -> Obj:
    result: Obj = yaml.safe_load(path.read_text())
    return result


def _apiserver_process(cluster: KubeCluster) -> tuple[int, list[bytes]]:
    """The apiserver's pid (DIR/apiserver.pid) and its command line."""
    pid = int((cluster.dir / "apiserver.pid").read_text())
    return pid, Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]


def _apiserver_binary() -> Path:
    if os.environ.get("KUBE_APISERVER"):
        return Path(os.environ["KUBE_APISERVER"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "buildkit-gateway" / "kube" / "kube-apiserver"


def _free_port_run(count: int) -> int:
    """A port p with p .. p+count-1 all free, below the ephemeral range (so no client socket
    takes one of them meanwhile)."""
    for _ in range(200):
        base = random.randrange(20000, 32000)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no run of {count} free ports")


async def _kill(pid: int) -> None:
    """SIGKILL a process and wait (on its pidfd, readable once it has exited) until it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(fd, exited.set)
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        async with asyncio.timeout(10):
            await exited.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"
