"""The hub: what every relay connection shares (pools, the ledger, upstreams, admission).

Design: connections call the hub for decisions that need the whole gateway's view: picking a
replica (a pure function of the registry snapshot, the ledger's loads and the pool's slots),
the upstream of a replica, the admission queue of a pool, and reports of builds and failures.
Per pool the hub keeps the hash ring, the admission queue and the cached LLBBridge Pong.
Everything runs on the event loop thread, so no locks. Admission work is collapsed: any number
of signals (a build ended, a replica became ready, a build was queued) schedule one admission
pass and one refresh of the positions shown to waiting clients. Ring work is bounded: a change
of a sticky pool's replicas starts making its ring at once, in steps of bounded work
(HashRing.steps_to), the first right away (a few replicas changed take just that one), then one
per loop turn; picks walk the last ring made meanwhile, and a change during the making is made
next, from the ring made.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.admission.progress import wait_label
from gateway.admission.queue import AdmissionQueue, Waiter
from gateway.builds.ledger import BuildRecord, Ledger
from gateway.config import (
    Endpoint,
    PoolSettings,
    RelaySettings,
    RoutingSettings,
    parse_endpoint,
)
from gateway.metrics import Metrics
from gateway.relay.backend import Upstream
from gateway.relay.call import Call
from gateway.relay.guard import Abuse
from gateway.replicas.registry import Registry, Snapshot
from gateway.routing import affinity
from gateway.routing import pick as picking
from gateway.routing.key import authority_name
from gateway.routing.placement import WAIT, ConnectionPlacement, Pick, Placed
from gateway.routing.ring import HashRing, Steps

if TYPE_CHECKING:
    from gateway.relay.client import ClientConn

log = logging.getLogger("gateway.relay")

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


@dataclass(slots=True)
class PoolState:
    settings: PoolSettings
    queue: AdmissionQueue
    # The pool's placeable replicas as of registry `version`, and the same as a set: one
    # object while the set does not change (the key of the ledger's tallies of the pool).
    placeable: tuple[str, ...] = ()
    members: frozenset[str] = frozenset()
    version: int = -1
    # The hash ring over `members` as of `ring_version`, unless the next one is being made
    # (`ring_steps`, one step per loop turn): then the last one made.
    ring: HashRing = field(default_factory=lambda: HashRing(()))
    ring_version: int = -1
    ring_steps: Steps | None = None
    pong: bytes | None = None  # a replica's LLBBridge Ping answer (DATA bytes, gRPC framed)


def _ignore(pool: str) -> None:
    pass


class Hub:
    control_id = "control"

    def __init__(
        self,
        *,
        relay: RelaySettings,
        routing: RoutingSettings,
        pools: tuple[PoolSettings, ...],
        registry: Registry,
        ledger: Ledger,
        control: Endpoint,
        spawn: Spawn,
        metrics: Metrics,
        eject: Callable[[str, str], None],
        rng: random.Random | None = None,
        replica_tls: ssl.SSLContext | None = None,
        servername: str = "",
    ) -> None:
        self.relay = relay
        self.replica_tls = replica_tls  # TLS toward tcp:// replicas (relay/tls.py), or None
        self.servername = servername  # the name replicas' certificates carry ("": the host)
        self.routing = routing
        self.registry = registry
        self.ledger = ledger
        self.metrics = metrics
        self._eject = eject
        self._spawn = spawn
        self.draining = False  # stopping: no new builds, /readyz false
        self.streams: dict[str, int] = {}  # call class -> open client streams
        self._opened = metrics.streams_opened  # call class -> client streams ever opened
        self._rng = rng or random.Random()
        # Per sticky key the replica that last ran it (routing/affinity.py), shared with the
        # other gateways by scaling/lease.py.
        self.affinity = affinity.Memory(routing.affinity_keys)
        self._wall = time.time  # affinity entries carry Unix time (merged across gateways)
        self.pools: dict[str, PoolState] = {
            p.name: PoolState(p, AdmissionQueue(max_queue=p.max_queue, timeout=p.queue_timeout,
                                                max_per_tenant=p.tenant_max_queue))
            for p in pools
        }
        self.tenant_builds: dict[tuple[str, str], int] = {}  # (pool, tenant) -> running
        self._build_tenants: dict[tuple[str, str], tuple[str, str]] = {}  # (ref, replica) ->
        self.default_pool = pools[0].name
        self._by_listener = {str(ep): p.name for p in pools for ep in p.listen}
        self._by_authority = {a: p.name for p in pools for a in p.authorities}
        self.upstreams: dict[str, Upstream] = {
            self.control_id: Upstream(self, self.control_id, control, relay)
        }
        self.abuse = Abuse(relay, metrics)  # connection counts, client limits (guard.py)
        self.clients: set[ClientConn] = set()
        self.no_clients = asyncio.Event()
        self.no_clients.set()
        self.loop = asyncio.get_running_loop()
        self._admission_scheduled = False
        self._queue_timer: asyncio.TimerHandle | None = None
        self.starting: dict[str, int] = {}  # pool -> replicas being started (the scaler's)
        self.on_demand: Callable[[str], None] = _ignore  # a pool's builds changed (scaler)
        registry.subscribe(self._registry_changed)
        self._update_rings(registry.snapshot)

    def ready(self) -> bool:
        """Serving, not draining, and some replica takes builds (/readyz)."""
        return not self.draining and any(r.placeable for r in self.registry.snapshot.replicas)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        self._spawn(coro, name)

    def now(self) -> float:
        return self.loop.time()

    # ---- pools and placement ---------------------------------------------------------------

    def pool_for(self, *, listener: str, authority: str) -> str:
        """A connection's pool: by its listener, else by :authority host, else the default."""
        pool = self._by_listener.get(listener)
        if pool is None:
            pool = self._by_authority.get(authority_name(authority) or "", self.default_pool)
        return pool

    def new_placement(self, *, authority: str, client: str) -> ConnectionPlacement:
        return ConnectionPlacement(
            authority=authority,
            client=client or None,
            session_wait=self.routing.session_wait,
            hold_timeout=self.routing.hold_timeout,
        )

    def picker(self, pool: str, tenant: str) -> Callable[..., Pick]:
        def pick(key: str | None, *, internal: bool, ref: str,
                 target: str | None = None) -> Pick:
            return self.pick(pool, key, internal=internal, ref=ref, target=target,
                             tenant=tenant)

        return pick

    def allowed(self, pool: str, tenant: str) -> bool:
        allow = self.pools[pool].settings.allow
        return not allow or tenant in allow

    def _has_slot(self, state: PoolState, replica: str) -> bool:
        limit = state.settings.max_builds
        return not limit or self.ledger.loads().get(replica, 0) < limit

    def pick(self, pool: str, key: str | None, *, internal: bool, ref: str,
             target: str | None = None, queued: bool = False, tenant: str = "") -> Pick:
        """A replica with a free slot, WAIT (queue), or None (the target left the pool).

        `queued` is set by admission: a new build may not take a slot while builds of its pool
        wait (in fair order), a queued one may. A tenant at its --tenant-max-builds waits.
        Candidates are the pool's placeable replicas open to the build: not running
        its Ref already and, unless internal, below --max-builds (routing/pick.py). Nothing
        here scans the pool: the open replicas' count and load are the ledger's running
        tallies, the sticky walk stops at the replica it takes, two choices draws at random.
        """
        state = self.pools[pool]
        limit = state.settings.tenant_max_builds
        if not internal and limit and self.tenant_builds.get((pool, tenant), 0) >= limit:
            return WAIT
        snap = self.registry.snapshot
        if target is not None:
            if target not in snap.by_id:
                return None
            if not snap.by_id[target].serving:  # a scale-down victim still takes bound builds
                return WAIT if queued else None
            if internal or self._has_slot(state, target):
                return target, picking.Outcome.BOUND
            return WAIT
        if not internal and state.queue and not queued:
            return WAIT
        self._candidates(state, snap)
        if internal and not ref:  # every placeable replica is open: no tallies needed
            chosen = picking.two_choices(state.placeable, self.ledger.loads(), self._rng)
            return WAIT if chosen is None else (chosen, picking.Outcome.RANDOM)
        exclude = self.ledger.running_on(ref) if ref else frozenset()
        loads = self.ledger.loads()
        slots = 0 if internal else state.settings.max_builds
        count, load = picking.open_share(self.ledger.tally(state.members, limit=slots),
                                         state.members, loads, exclude=exclude, limit=slots)
        if not count:
            return WAIT
        if not internal and key is not None and state.settings.loadbalance != "random":
            cap = picking.load_cap(load=load, count=count, c=state.settings.load_factor)
            chosen_pair = picking.bounded(self._walk(state, key), loads, cap=cap,
                                          exclude=exclude, limit=slots)
            if chosen_pair is not None:
                if self.affinity.capacity:
                    return self._remembered(state, key, chosen_pair, loads, cap=cap,
                                            exclude=exclude, limit=slots)
                return chosen_pair
            # none: the last ring made lacks the open replicas while the next is made (_walk)
        chosen = picking.two_choices(state.placeable, loads, self._rng, exclude=exclude,
                                     limit=slots)
        return WAIT if chosen is None else (chosen, picking.Outcome.RANDOM)

    def pick_other(self, pool: str) -> str | None:
        """`pick(pool, None, internal=True, ref="")`'s replica (a call outside any build), or
        None when the pool has none."""
        state = self.pools[pool]
        self._candidates(state, self.registry.snapshot)
        return picking.two_choices(state.placeable, self.ledger.loads(), self._rng)

    def _remembered(self, state: PoolState, key: str, ring_pick: tuple[str, picking.Outcome],
                    loads: Mapping[str, int], *, cap: int, exclude: frozenset[str],
                    limit: int) -> tuple[str, picking.Outcome]:
        """Cache affinity: the replica that last ran `key` while it is placeable, open and
        within the load bound, else the ring's pick, which becomes the key's memory."""
        pool = state.settings.name
        name = affinity.digest(pool, key)
        last = self.affinity.last(name)
        chosen = ring_pick
        if last is None:
            result = "new"
        elif last == ring_pick[0]:
            result = "hit"
        elif (last in state.members and loads.get(last, 0) < cap
              and picking.is_open(last, loads, exclude=exclude, limit=limit)):
            chosen, result = (last, picking.Outcome.AFFINITY), "hit"
        else:
            result = "miss"
        self.metrics.affinity.labels(pool, result).inc()
        self.affinity.remember(name, chosen[0], now=self._wall())
        return chosen

    def _candidates(self, state: PoolState, snap: Snapshot) -> None:
        """Brings the pool's placeable replicas up to `snap`, once per registry version; an
        unchanged set keeps its `members` object (and so the ledger's running tallies)."""
        if snap.version != state.version:
            placeable = snap.placeable(state.settings.name)
            members = frozenset(placeable)
            if members != state.members:
                state.members = members
            state.placeable = placeable
            state.version = snap.version

    def _walk(self, state: PoolState, key: str) -> Iterator[str]:
        """The placeable replicas in the order of the pool's ring from `key`. While the ring
        is being made (or after a step failed), the last ring made's order, without the
        replicas that left the pool (those that came are in none of it yet)."""
        walk = self._ring(state).walk(key)
        if state.ring_steps is None and state.ring_version == state.version:
            return walk
        return (replica for replica in walk if replica in state.members)

    def _update_rings(self, snapshot: Snapshot) -> None:
        """Brings the sticky pools' replicas up to `snapshot` and starts making the ring of
        those whose replicas changed, rather than at their next pick."""
        for state in self.pools.values():
            if state.settings.loadbalance != "random":
                self._candidates(state, snapshot)
                self._ring(state)

    def _ring(self, state: PoolState) -> HashRing:
        """The ring picks walk (_walk): the pool's ring over its placeable replicas, or the
        last one made while that is being made. A version change starts making it unless
        that is under way (then it is made next): an unchanged set keeps the ring, a few
        replicas changed are spliced in, more take a full build (HashRing.steps_to)."""
        if state.ring_version != state.version:
            state.ring_version = state.version
            if state.ring_steps is None:
                state.ring_steps = state.ring.steps_to(state.members)
                self._ring_step(state)
        return state.ring

    def _ring_step(self, state: PoolState) -> None:
        """One step of making the pool's ring; the next at the next loop turn, until the ring
        made is over the pool's replicas as they are now. A step that fails (a bug) is logged
        and the making dropped, to be started again at the next pick: picks go on meanwhile
        (from the last ring made, or two choices), and nothing escapes into a pick or a
        registry listener."""
        assert state.ring_steps is not None
        try:
            next(state.ring_steps)
        except StopIteration as made:
            state.ring = made.value
            if state.ring.members == state.members:
                state.ring_steps = None
                return
            state.ring_steps = state.ring.steps_to(state.members)
        except Exception:
            log.exception("ring step failed", extra={"pool": state.settings.name})
            state.ring_steps = None
            state.ring_version = -1
            return
        self.loop.call_soon(self._ring_step, state)

    def locate(self, ref: str) -> str | None:
        """Where a Ref runs (if on exactly one replica) or ran."""
        running = self.ledger.running_on(ref)
        if len(running) == 1:
            return next(iter(running))
        return self.ledger.owner(ref)

    # ---- admission -------------------------------------------------------------------------

    def enqueue(self, pool: str, waiter: Waiter) -> errors.GatewayError | None:
        """Queues a build; the error to refuse it with when the queue (or the tenant's part of
        it) is full."""
        queue = self.pools[pool].queue
        if not queue.offer(waiter, self.now()):
            self.metrics.queue_full.labels(pool).inc()
            if len(queue) < queue.max_queue:
                return errors.TenantQueueFull(
                    f"client {waiter.tenant} already has {queue.queued_by(waiter.tenant)} "
                    f"builds waiting for a BuildKit replica of pool {pool} "
                    f"(--tenant-max-queue {queue.max_per_tenant})")
            return errors.QueueFull(
                f"{len(queue)} builds are already waiting for a BuildKit replica of pool "
                f"{pool} (--max-queue {queue.max_queue}); waited 0s")
        self.on_demand(pool)
        self.metrics.placements.labels(pool, self.pools[pool].settings.loadbalance,
                                       "queued").inc()
        log.info("build queued", extra={"pool": pool, "ref": waiter.ref,
                                        "tenant": waiter.tenant,
                                        "queued": len(self.pools[pool].queue)})
        self.schedule_admission()
        return None

    def dequeue(self, pool: str, ticket: int, *, outcome: str = "cancelled") -> None:
        waiter = self.pools[pool].queue.remove(ticket)
        if waiter is not None:
            self.metrics.queue_wait.labels(pool, outcome).observe(self.now() - waiter.enqueued)
            self.schedule_admission()
            self.on_demand(pool)

    def schedule_admission(self) -> None:
        if not self._admission_scheduled:
            self._admission_scheduled = True
            self.loop.call_soon(self._run_admission)

    def _registry_changed(self, snapshot: Snapshot) -> None:
        self.schedule_admission()
        self._update_rings(snapshot)

    def _run_admission(self) -> None:
        from gateway.relay.conn import flush_dirty

        self._admission_scheduled = False
        now = self.now()
        for name, state in self.pools.items():
            for waiter in state.queue.expire(now):
                conn, stream = waiter.handle
                waited = now - waiter.enqueued
                self.metrics.queue_wait.labels(name, "timeout").observe(waited)
                conn.rejected(stream, errors.QueueTimeout(
                    f"no BuildKit replica of pool {name} became free within {waited:.0f}s "
                    f"(--queue-timeout {state.settings.queue_timeout:g}s)"))
                self.on_demand(name)
            if not state.queue:
                continue

            def place(waiter: Waiter, pool: str = name) -> str | None:
                chosen = self.pick(pool, waiter.key, internal=waiter.internal, ref=waiter.ref,
                                   target=waiter.target, queued=True, tenant=waiter.tenant)
                if isinstance(chosen, tuple):
                    self.metrics.queue_wait.labels(pool, "admitted").observe(
                        now - waiter.enqueued)
                    waiter.handle[0].admitted(waiter.handle[1], chosen[0], chosen[1],
                                              now - waiter.enqueued)
                    return chosen[0]
                return None

            state.queue.admit(place)
            for ahead, waiter in enumerate(state.queue):
                conn, stream = waiter.handle
                conn.show_wait(stream, self.wait_label(name, ahead))
        self._arm_queue_timer()
        flush_dirty()

    def _arm_queue_timer(self) -> None:
        deadlines = [d for s in self.pools.values() if (d := s.queue.next_deadline()) is not None]
        if self._queue_timer is not None:
            self._queue_timer.cancel()
            self._queue_timer = None
        if deadlines:
            self._queue_timer = self.loop.call_at(min(deadlines), self.schedule_admission)

    def queued(self) -> int:
        return sum(len(s.queue) for s in self.pools.values())

    def wait_label(self, pool: str, ahead: int) -> str:
        serving = sum(1 for r in self.registry.snapshot.replicas if r.pool == pool and r.serving)
        return wait_label(ahead=ahead, starting=self.starting.get(pool, 0), serving=serving)

    def set_starting(self, pool: str, count: int) -> None:
        """The scaler's count of replicas asked for that do not serve yet."""
        if self.starting.get(pool, 0) != count:
            self.starting[pool] = count
            self.schedule_admission()  # the waits shown name it

    # ---- upstreams -------------------------------------------------------------------------

    def open_upstream(self, call: Call, replica_id: str) -> None:
        upstream = self.upstreams.get(replica_id)
        if upstream is None:
            replica = self.registry.snapshot.by_id.get(replica_id)
            if replica is None:
                call.client.end_with_error(call, errors.NoReplica(
                    f"BuildKit replica {replica_id} is no longer in the pool"))
                return
            upstream = Upstream(self, replica_id, parse_endpoint(replica.address), self.relay)
            self.upstreams[replica_id] = upstream
        upstream.open(call)

    def cancel_pending(self, call: Call) -> None:
        if call.replica is not None:
            upstream = self.upstreams.get(call.replica)
            if upstream is not None:
                upstream.cancel(call)

    def replica_unreachable(self, replica_id: str, reason: str) -> None:
        """A dial failed, or a connection with calls open broke: eject the replica."""
        if replica_id != self.control_id:
            self._eject(replica_id, reason)

    def replica_dead(self, replica_id: str, reason: str) -> int:
        """The replica stopped answering (the prober's verdict): its connections are dropped and
        each call open on them ends as on a lost connection, UNAVAILABLE naming the replica,
        with `reason`. Returns how many calls were open."""
        upstream = self.upstreams.get(replica_id)
        ended = 0
        for conn in list(upstream.conns if upstream is not None else ()):
            ended += len(conn.calls)
            conn.abort()  # the transport's own report of the loss, later, finds nothing left
            conn.connection_lost(ConnectionAbortedError(reason))
        return ended

    def store_pong(self, pool: str, body: bytes) -> None:
        self.pools[pool].pong = body

    # ---- reports from connections ----------------------------------------------------------

    def client_opened(self, conn: ClientConn) -> None:
        self.clients.add(conn)
        self.no_clients.clear()
        self.metrics.client_connections.inc()

    def stream_opened(self, call: Call) -> None:
        klass = call.klass._value_  # not .value: an enum descriptor, slower
        self.streams[klass] = self.streams.get(klass, 0) + 1
        opened = self._opened
        opened[klass] = opened.get(klass, 0) + 1

    def stream_closed(self, call: Call) -> None:
        self.streams[call.klass._value_] -= 1

    def pool_of(self, replica: str) -> str:
        r = self.registry.snapshot.by_id.get(replica)
        return r.pool if r is not None else ""

    def client_closed(self, conn: ClientConn) -> None:
        self.clients.discard(conn)
        if not self.clients:
            self.no_clients.set()

    def build_placed(self, placed: Placed, call: Call | None) -> None:
        started = self.ledger.start(placed.ref, placed.replica, internal=placed.internal,
                                    now=self.now())
        if not started:  # a duplicate: the replica answers "job ID exists"
            return
        if call is not None:
            call.build = (placed.ref, placed.replica)
        pool = self.pool_of(placed.replica)
        if call is not None and not placed.internal:
            self.metrics.tenant_builds.labels(pool, call.client.identity or "-").inc()
            tenant = (pool, call.client.tenant)
            self._build_tenants[(placed.ref, placed.replica)] = tenant
            self.tenant_builds[tenant] = self.tenant_builds.get(tenant, 0) + 1
        self.metrics.builds_started.labels(pool, placed.replica,
                                           str(placed.internal).lower()).inc()
        if not placed.internal:
            policy = self.pools[pool].settings.loadbalance if pool in self.pools else ""
            self.metrics.placements.labels(pool, policy, placed.outcome.value).inc()
        self.on_demand(pool)  # internal builds too: they keep their replica busy
        log.debug("build placed", extra={"ref": placed.ref, "replica": placed.replica,
                                         "internal": placed.internal,
                                         "outcome": placed.outcome.value})

    def build_finished(self, call: Call, result: str) -> None:
        if call.build is None:
            return
        ref, replica = call.build
        call.build = None
        tenant = self._build_tenants.pop((ref, replica), None)
        if tenant is not None:
            left = self.tenant_builds[tenant] - 1
            if left:
                self.tenant_builds[tenant] = left
            else:
                del self.tenant_builds[tenant]
            self.schedule_admission()  # the tenant's next build may go now
        record = self.ledger.finish(ref, replica, result=result, now=self.now())
        if record is not None:
            log.info("build finished", extra={"ref": ref, "replica": replica,
                                              "internal": record.internal, "result": result,
                                              "duration_s": round(record.duration or 0, 3)})
            self._count_finished(record, result)
            if not record.internal:
                self.schedule_admission()
            self.on_demand(self.pool_of(record.replica))

    def _count_finished(self, record: BuildRecord, result: str) -> None:
        pool = self.pool_of(record.replica)
        self.metrics.builds_finished.labels(pool, record.replica, result,
                                            str(record.internal).lower()).inc()
        if not record.internal:
            self.metrics.build_duration.labels(pool, result).observe(record.duration or 0.0)

    def call_failed(self, call: Call, err: errors.GatewayError) -> None:
        log.info("call failed", extra={"path": call.path, "code": errors.CODE_NAMES[err.code],
                                       "error": err.message})
