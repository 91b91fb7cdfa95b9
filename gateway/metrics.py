"""Every Prometheus metric of the gateway, in one place, on an injected registry.

Design: event counters and histograms are updated where things happen (a build starts or ends,
a placement is made, a client connects, a frame layer error); everything that is a *state*
(active builds, queue lengths, replicas by state, open connections and streams) is read from
the gateway's own snapshots at scrape time by `StateCollector`, so the hot path pays nothing
for it. Names follow Prometheus conventions: `buildkit_gateway_` prefix, base units
(seconds, bytes), `_total` on counters. Labels are bounded: pool and replica names come from
configuration or discovery, results and kinds from fixed sets; routing keys, Refs and client
addresses never appear.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "buildkit_gateway_"

BUILD_SECONDS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
WAIT_SECONDS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True, slots=True)
class State:
    """What the gauges show, read from the gateway when Prometheus scrapes."""

    active_builds: dict[tuple[str, str, bool], int]  # (pool, replica, internal) -> builds
    queued: dict[str, int]  # pool -> builds waiting
    replicas: dict[tuple[str, str], str]  # (pool, replica) -> state
    clients: int
    streams: dict[str, int]  # call class -> open client streams
    ready: bool
    draining: bool
    slots: dict[tuple[str, str], int] = field(default_factory=dict)  # (pool, replica) -> slots


REPLICA_STATES = ("ready", "not_ready", "ejected", "draining")


class StateCollector(Collector):
    def __init__(self, read: Callable[[], State | None]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return []  # state gauges appear once the gateway runs

    def collect(self) -> Iterator[Metric]:
        state = self._read()
        if state is None:
            return
        active = GaugeMetricFamily(PREFIX + "builds_active", "Builds running on a replica.",
                                   labels=["pool", "replica", "internal"])
        for (pool, replica, internal), n in sorted(state.active_builds.items()):
            active.add_metric([pool, replica, str(internal).lower()], n)
        yield active
        slots = GaugeMetricFamily(PREFIX + "replica_slots",
                                  "Concurrent build slots of a replica (0: unlimited).",
                                  labels=["pool", "replica"])
        for (pool, replica), n in sorted(state.slots.items()):
            slots.add_metric([pool, replica], n)
        yield slots
        queued = GaugeMetricFamily(PREFIX + "queue_length", "Builds waiting for a replica.",
                                   labels=["pool"])
        for pool, n in sorted(state.queued.items()):
            queued.add_metric([pool], n)
        yield queued
        up = GaugeMetricFamily(PREFIX + "replica_up",
                               "1 if the replica takes new builds (probed ready, not ejected, "
                               "not draining).", labels=["pool", "replica"])
        by_state = GaugeMetricFamily(PREFIX + "replicas", "Replicas of a pool by state.",
                                     labels=["pool", "state"])
        counts: dict[tuple[str, str], int] = {}
        for (pool, replica), st in sorted(state.replicas.items()):
            up.add_metric([pool, replica], 1 if st == "ready" else 0)
            counts[(pool, st)] = counts.get((pool, st), 0) + 1
        for pool in sorted({p for p, _r in state.replicas} | set(state.queued)):
            for st in REPLICA_STATES:
                by_state.add_metric([pool, st], counts.get((pool, st), 0))
        yield up
        yield by_state
        clients = GaugeMetricFamily(PREFIX + "client_connections",
                                    "Open client HTTP/2 connections.")
        clients.add_metric([], state.clients)
        yield clients
        streams = GaugeMetricFamily(PREFIX + "streams", "Open client streams by call class.",
                                    labels=["class"])
        for klass, n in sorted(state.streams.items()):
            streams.add_metric([klass], n)
        yield streams
        ready = GaugeMetricFamily(PREFIX + "ready",
                                  "1 while the gateway is ready for builds (/readyz).")
        ready.add_metric([], 1 if state.ready else 0)
        yield ready
        draining = GaugeMetricFamily(PREFIX + "draining", "1 while the gateway is stopping.")
        draining.add_metric([], 1 if state.draining else 0)
        yield draining


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, version: str) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = registry
        self.builds_started = Counter(
            PREFIX + "builds_started", "Builds placed on a replica.",
            ["pool", "replica", "internal"], registry=registry)
        self.builds_finished = Counter(
            PREFIX + "builds_finished", "Builds ended, by result: ok; cancelled (by the client "
            "or the replica); replica_lost, replica_reset, refused; else the lower-case gRPC "
            "code of the Solve (BuildKit reports build errors as unknown).",
            ["pool", "replica", "result", "internal"], registry=registry)
        self.build_duration = Histogram(
            PREFIX + "build_duration_seconds", "Time from placement to the end of the Solve, "
            "non-internal builds.", ["pool", "result"], buckets=BUILD_SECONDS, registry=registry)
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds", "Time builds waited in the queue, by how the wait "
            "ended (admitted, timeout, cancelled, shutdown).", ["pool", "outcome"],
            buckets=WAIT_SECONDS, registry=registry)
        self.queue_full = Counter(
            PREFIX + "queue_full", "Builds refused because the queue was at --max-queue.",
            ["pool"], registry=registry)
        self.placements = Counter(
            PREFIX + "placements", "Placement decisions of non-internal builds by policy and "
            "outcome (primary, spill, random, bound, affinity; queued: it waits, and counts "
            "again when placed).", ["pool", "policy", "outcome"], registry=registry)
        self.affinity = Counter(
            PREFIX + "affinity_placements", "Sticky placements by cache affinity: hit (placed "
            "on the replica that last ran the key), miss (that replica gone or too loaded), "
            "new (no memory of the key).", ["pool", "result"], registry=registry)
        self.client_connections = Counter(
            PREFIX + "client_connections_accepted", "Client connections accepted.",
            registry=registry)
        # Client streams opened per call class, counted on the hot path as plain ints (a
        # Counter takes a lock per inc) and exported at scrape time.
        self.streams_opened: dict[str, int] = {}
        registry.register(StreamsOpened(self.streams_opened))
        # Bytes read on each hop, counted on the hot path as plain ints (no lock per read)
        # and exported at scrape time: [upstream from clients, downstream from replicas].
        self.relayed = [0, 0]
        registry.register(RelayedBytes(self.relayed))
        self.http2_errors = Counter(
            PREFIX + "http2_errors", "Connections ended for an HTTP/2 protocol error, by "
            "error code (not_http2: no client preface).", ["peer", "kind"], registry=registry)
        self.replica_ejections = Counter(
            PREFIX + "replica_ejections", "Replicas taken out of placement after a connect "
            "failure or a lost connection.", ["pool", "replica"], registry=registry)
        self.probe_failures = Counter(
            PREFIX + "probe_failures", "Failed active probes of a replica.",
            ["pool", "replica"], registry=registry)
        self.tenant_builds = Counter(
            PREFIX + "tenant_builds_started", "Builds placed, by tenant: the client "
            "certificate's name with mTLS (as many as the CA issues), '-' for clients "
            "without one (addresses would be unbounded).", ["pool", "tenant"],
            registry=registry)
        self.client_limits = Counter(
            PREFIX + "client_limits", "Limits clients hit, by kind (rates: resets, pings, "
            "settings, refused_streams; timeouts: handshake_timeout, header_timeout, idle, "
            "write_timeout; connections, connections_per_client); each ends or refuses a "
            "connection, except idle which closes it.", ["kind"], registry=registry)
        self.tls_refused = Counter(
            PREFIX + "tls_handshakes_refused", "Client TLS handshakes the listener refused, by "
            "reason (no_certificate, expired_certificate, untrusted_certificate, protocol, "
            "timeout); each sent the client its TLS alert and is logged.", ["reason"],
            registry=registry)
        # Kubernetes discovery and autoscaling (absent without them, but for kube_api_up).
        self.kube_api_up = Gauge(
            PREFIX + "kube_api_up", "1 while the Kubernetes API answered the gateway's last "
            "call (also 1 without Kubernetes).", registry=registry)
        self.scaler_leader = Gauge(
            PREFIX + "scaler_leader", "1 on the gateway that scales (holds the scaler Lease), "
            "0 on the others and without autoscaling.", registry=registry)
        self.kube_api_errors = Counter(
            PREFIX + "kube_api_errors", "Failed calls to the Kubernetes API, by operation.",
            ["operation"], registry=registry)
        self.watch_restarts = Counter(
            PREFIX + "kube_watch_restarts", "Pod watches renewed, by reason: expired (the "
            "normal end of a watch), gone (410: listed again), error.", ["pool", "reason"],
            registry=registry)
        self.scaler_desired = Gauge(
            PREFIX + "scaler_desired_replicas", "Replicas the demand asks for now "
            "(clamped to min and max, before the scale-down window).", ["pool"],
            registry=registry)
        self.scaler_current = Gauge(
            PREFIX + "scaler_current_replicas", "The Deployment's replica count, as last "
            "read or set.", ["pool"], registry=registry)
        self.scaler_starting = Gauge(
            PREFIX + "scaler_starting_replicas", "Replicas asked for that do not serve yet.",
            ["pool"], registry=registry)
        self.scale_events = Counter(
            PREFIX + "scale_events", "Changes of the Deployment's replica count by the "
            "gateway, by direction (up, down).", ["pool", "direction"], registry=registry)
        self.kube_api_up.set(1)
        registry.register(GaugeInfo(version))

    def watch(self, read: Callable[[], State | None]) -> None:
        self.registry.register(StateCollector(read))


UPSTREAM = 0
DOWNSTREAM = 1


class RelayedBytes(Collector):
    def __init__(self, counts: list[int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(PREFIX + "relayed_bytes", "HTTP/2 bytes read on each hop: "
                                     "direction=upstream from clients, downstream from "
                                     "replicas.", labels=["direction"])
        family.add_metric(["upstream"], self._counts[UPSTREAM])
        family.add_metric(["downstream"], self._counts[DOWNSTREAM])
        yield family


class StreamsOpened(Collector):
    def __init__(self, counts: dict[str, int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(PREFIX + "streams_opened",
                                     "Client streams opened, by call class.", labels=["class"])
        for klass, n in sorted(self._counts.items()):
            family.add_metric([klass], n)
        yield family


class GaugeInfo(Collector):
    """buildkit_gateway_build_info{version, python} 1."""

    def __init__(self, version: str) -> None:
        self._labels = [version, platform.python_version()]

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(PREFIX + "build_info", "Always 1; labels: the gateway's "
                                 "version and Python's.", labels=["version", "python"])
        info.add_metric(self._labels, 1)
        yield info
