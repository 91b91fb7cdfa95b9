"""The election among gateways and their published demand (coordination.k8s.io Leases).

Design (the pure rules are in scaling/shared.py): one task per gateway, `Coordinator.run`.
Each turn, every `duration / 5` seconds or sooner when this gateway's demand changed:
1. the election Lease (`--kube-lease`): read; if `may_lead`, write this gateway as holder
   (replace with the resourceVersion read, so of two gateways racing one gets 409 and stays a
   follower); a leader that has not renewed for two thirds of the duration steps down before
   anyone may take over (a partitioned leader stops scaling before its successor starts);
2. its own demand Lease `<lease>-<identity>`: the per-pool demand as an annotation, and its
   most recent cache-affinity entries (routing/affinity.py) as another, written when either
   changed and at least once per turn (the write is the renewal);
3. the demand Leases of the others (listed by label; every gateway reads them, so a successor
   knows the demand from its first turn and /api/status lists the gateways): fresh ones count
   on the leader, expired ones are ignored, and ones expired for `GC_AFTER` durations are
   deleted. Every changed one's affinity entries are merged into this gateway's memory, expired
   or not: a gateway restarted (or a new one) routes keys back to the replicas holding their
   caches as the others would.
Changes of `leading`, and of the others' demand that counts, call `on_change` (the app pokes
every scaler). A gateway that stops
`resign()`s at once (the election Lease handed back, holder empty, so a successor need not wait
for it to expire), goes on publishing the demand of its draining builds, and `withdraw()`s
its demand Lease last.

The Leases live in the namespace of the first autoscaled Deployment, where the gateway's Role
already lets it scale (deploy/base/gateway-rbac.yaml). Identity: `--identity`, else $POD_NAME
(the downward API), else the host name and a random suffix, so two gateways on one host differ.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from gateway.config import KubeSettings
from gateway.discovery.kube import API_ERRORS, Kube, describe
from gateway.metrics import Metrics
from gateway.routing import affinity
from gateway.scaling import shared
from gateway.scaling.shared import Demand, Record, Seen

log = logging.getLogger("gateway.scaling")

TURNS_PER_DURATION = 5
"""Renewals per lease duration."""
STEP_DOWN_AFTER = 2 / 3
"""A leader that could not renew for this fraction of the duration stops scaling."""
COALESCE = 0.05
"""Seconds a demand change waits for more before it is written."""
SHARED_KEYS = 500
"""Most recent cache-affinity entries a gateway publishes (about 45 bytes each)."""
GC_AFTER = 20
"""Durations after which an expired demand Lease (a gateway gone without `release`) is
deleted."""


def own_identity(configured: str) -> str:
    if configured:
        return configured
    pod = os.environ.get("POD_NAME", "")
    if pod:
        return pod
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


class Coordinator:
    def __init__(self, *, kube: Kube, settings: KubeSettings, namespace: str, identity: str,
                 demand: Callable[[], dict[str, Demand]], memory: affinity.Memory,
                 metrics: Metrics, on_change: Callable[[], None]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.identity = identity
        self.name = settings.lease
        self.own = shared.demand_lease_name(settings.lease, identity)
        self.duration = settings.lease_duration
        self.every = self.duration / TURNS_PER_DURATION
        self.backoff = settings.backoff
        self.backoff_max = settings.backoff_max
        self._demand = demand
        self.memory = memory  # cache affinity: published, and merged with the others'
        self.on_change = on_change
        self.metrics = metrics
        self._api = client.CoordinationV1Api(kube.api)
        self.leading = False
        self.leader = ""  # the holder last seen ("" none)
        self._seen: Seen | None = None
        self._renewed = 0.0  # when this gateway last wrote itself as holder
        self._peers: dict[str, Seen] = {}
        self._peer_demand: dict[str, dict[str, Demand]] = {}
        self._last_counted: dict[str, dict[str, Demand]] = {}  # as the scalers last saw it
        self._published: tuple[str, int] | None = None  # demand text, memory version
        self._published_at = -math.inf
        self._own_version: str | None = None  # resourceVersion of our demand Lease
        self.resigned = False  # stopping: never leads again
        self.wake = asyncio.Event()
        metrics.scaler_leader.set(0)

    # ---- what the scalers read -------------------------------------------------------------

    def others(self, pool: str) -> list[Demand]:
        """The fresh demand of the other gateways for `pool` (the leader's view)."""
        return [d[pool] for d in self._counted(self._now()).values() if pool in d]

    def demand_changed(self) -> None:
        self.wake.set()

    def document(self, now: float) -> dict[str, Any]:
        return {"identity": self.identity, "leader": self.leader, "leading": self.leading,
                "lease": f"{self.namespace}/{self.name}",
                "gateways": sorted([self.identity, *(
                    s.record.holder for s in self._peers.values() if not s.expired(now))])}

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = self.backoff
        while True:
            try:
                await self._turn()
                self.kube.health.succeeded()
                backoff = self.backoff
                wait = self.every
            except API_ERRORS as exc:
                self.kube.health.failed("lease", exc)
                wait = backoff
                backoff = min(backoff * 2, self.backoff_max)
            self._check_step_down()
            try:
                await asyncio.wait_for(self.wake.wait(), wait)
                await asyncio.sleep(COALESCE)  # a burst of changes: one write
            except TimeoutError:
                pass
            self.wake.clear()

    async def _turn(self) -> None:
        now = self._now()
        if not self.resigned and (not self.leading or now - self._renewed >= self.every * 0.9):
            await self._elect()
        await self._publish(force=self._now() - self._published_at >= self.every * 0.9)
        await self._read_peers()

    # ---- 1. the election ---------------------------------------------------------------------

    async def _elect(self) -> None:
        try:
            lease = await self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            lease = None
        now = self._now()
        if lease is None:
            await self._take(None, now)
            return
        spec = lease.spec or client.V1LeaseSpec()
        record = Record(spec.holder_identity or "", float(spec.lease_duration_seconds or 0),
                        str(lease.metadata.resource_version))
        self._seen = shared.observe(self._seen, record, now)
        if shared.may_lead(self._seen, self.identity, now):
            await self._take(lease, now)
        else:
            self._set_leader(record.holder)

    async def _take(self, lease: client.V1Lease | None, now: float) -> None:
        stamp = datetime.now(UTC)
        seconds = max(1, math.ceil(self.duration))
        try:
            if lease is None:
                body = client.V1Lease(
                    metadata=client.V1ObjectMeta(name=self.name),
                    spec=client.V1LeaseSpec(holder_identity=self.identity,
                                            lease_duration_seconds=seconds,
                                            acquire_time=stamp, renew_time=stamp,
                                            lease_transitions=0))
                written = await self._api.create_namespaced_lease(self.namespace, body)
            else:
                spec = lease.spec or client.V1LeaseSpec()
                if spec.holder_identity != self.identity:
                    spec.acquire_time = stamp
                    spec.lease_transitions = (spec.lease_transitions or 0) + 1
                spec.holder_identity = self.identity
                spec.lease_duration_seconds = seconds
                spec.renew_time = stamp
                lease.spec = spec
                written = await self._api.replace_namespaced_lease(self.name, self.namespace,
                                                                   lease)
        except ApiException as exc:
            if exc.status == 409:  # another gateway wrote first: read again next turn
                self._seen = None
                if self.leading:
                    self._set_leader("")
                return
            raise
        self._renewed = now
        self._seen = Seen(Record(self.identity, float(seconds),
                                 str(written.metadata.resource_version)), now)
        self._set_leader(self.identity)

    def _check_step_down(self) -> None:
        if self.leading and self._now() - self._renewed >= self.duration * STEP_DOWN_AFTER:
            log.warning("scaler lease not renewed in time; no longer scaling",
                        extra={"identity": self.identity, "lease": self.name})
            self._seen = None
            self._set_leader("")

    def _set_leader(self, holder: str) -> None:
        leading = holder == self.identity
        if holder != self.leader:
            log.info("scaler leader", extra={"leader": holder or "-",
                                             "identity": self.identity})
            self.leader = holder
        if leading != self.leading:
            self.leading = leading
            self.metrics.scaler_leader.set(1 if leading else 0)
            self.on_change()

    # ---- 2. this gateway's demand ------------------------------------------------------------

    async def _publish(self, *, force: bool) -> None:
        text = shared.encode_demand(self._demand())
        state = (text, self.memory.version)
        if state == self._published and not force:
            return
        seconds = max(1, math.ceil(self.duration))
        remembered = json.dumps(affinity.encode(self.memory.recent(SHARED_KEYS)),
                                separators=(",", ":"))
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=self.own, labels={shared.GROUP_LABEL: self.name},
                annotations={shared.DEMAND_ANNOTATION: text,
                             shared.AFFINITY_ANNOTATION: remembered},
                resource_version=self._own_version),
            spec=client.V1LeaseSpec(holder_identity=self.identity,
                                    lease_duration_seconds=seconds,
                                    renew_time=datetime.now(UTC)))
        try:
            if self._own_version is None:
                written = await self._create_or_replace(body)
            else:
                written = await self._api.replace_namespaced_lease(self.own, self.namespace,
                                                                   body)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
            self._own_version = None  # deleted or changed by someone: write it whole again
            body.metadata.resource_version = None  # type: ignore[assignment]
            written = await self._create_or_replace(body)
        self._own_version = str(written.metadata.resource_version)
        self._published = state
        self._published_at = self._now()

    async def _create_or_replace(self, body: client.V1Lease) -> client.V1Lease:
        try:
            return await self._api.create_namespaced_lease(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        current = await self._api.read_namespaced_lease(self.own, self.namespace)
        body.metadata.resource_version = current.metadata.resource_version
        return await self._api.replace_namespaced_lease(self.own, self.namespace, body)

    # ---- 3. the others' demand ------------------------------------------------------

    async def _read_peers(self) -> None:
        leases = await self._api.list_namespaced_lease(
            self.namespace, label_selector=f"{shared.GROUP_LABEL}={self.name}")
        now = self._now()
        listed: set[str] = set()
        stale: list[str] = []
        for lease in leases.items:
            name = str(lease.metadata.name)
            if name == self.own:
                continue
            listed.add(name)
            spec = lease.spec or client.V1LeaseSpec()
            record = Record(spec.holder_identity or "", float(spec.lease_duration_seconds or 0),
                            str(lease.metadata.resource_version))
            previous = self._peers.get(name)
            seen = self._peers[name] = shared.observe(previous, record, now)
            if seen is not previous:  # written since: its demand, its builds' places
                annotations = lease.metadata.annotations or {}
                self._peer_demand[name] = shared.decode_demand(
                    annotations.get(shared.DEMAND_ANNOTATION))
                self.memory.merge(affinity.decode(_json(  # expired or not
                    annotations.get(shared.AFFINITY_ANNOTATION))))
            if now >= seen.at + GC_AFTER * max(record.duration, self.duration):
                stale.append(name)
        for gone in set(self._peers) - listed:
            del self._peers[gone]
            self._peer_demand.pop(gone, None)
        for name in stale:
            await self._delete(name)
        counted = self._counted(now)
        if counted != self._last_counted:  # the scalers decide again on the sum
            self._last_counted = counted
            self.on_change()

    def _counted(self, now: float) -> dict[str, dict[str, Demand]]:
        return {name: d for name, d in self._peer_demand.items()
                if name in self._peers and not self._peers[name].expired(now)}

    async def _delete(self, name: str) -> None:
        try:
            await self._api.delete_namespaced_lease(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        self._peers.pop(name, None)
        self._peer_demand.pop(name, None)

    # ---- shutdown ----------------------------------------------------------------------------

    async def resign(self) -> None:
        """Stops scaling and hands the election back at once (holder empty, so a successor
        need not wait for the Lease to expire); the demand goes on being published while this
        gateway's builds finish."""
        self.resigned = True
        if not self.leading:
            return
        self._set_leader("")
        try:
            lease = await self._api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = ""  # released: anyone may take it at once
                lease.spec.lease_duration_seconds = 1
                await self._api.replace_namespaced_lease(self.name, self.namespace, lease)
        except API_ERRORS as exc:
            log.warning("scaler lease not handed back", extra={"error": describe(exc)})

    async def withdraw(self) -> None:
        """Deletes this gateway's demand Lease (the last step of a stop)."""
        if self._own_version is None:
            return
        try:
            await self._delete(self.own)
        except API_ERRORS as exc:
            log.warning("demand lease not deleted", extra={"error": describe(exc)})

    def _now(self) -> float:
        return asyncio.get_running_loop().time()


def _json(text: str | None) -> object:
    try:
        return json.loads(text or "[]")
    except ValueError:
        return None

