"""The hub: what every relay connection shares (the pool, the ledger, upstreams, the picker).

Design: connections call the hub for decisions that need the whole gateway's view: picking a
replica (a pure function of the registry snapshot and the ledger's loads), finding the upstream
of a replica, and reporting builds and failures. The hash ring is rebuilt only when the registry
snapshot's version changes. The hub holds no locks: everything runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.builds.ledger import Ledger
from gateway.config import (
    Endpoint,
    PoolSettings,
    RelaySettings,
    RoutingSettings,
    parse_endpoint,
)
from gateway.relay.backend import Upstream
from gateway.relay.call import Call
from gateway.replicas.registry import Registry
from gateway.routing import pick as picking
from gateway.routing.placement import ConnectionPlacement, Placed
from gateway.routing.ring import HashRing

if TYPE_CHECKING:
    from gateway.relay.client import ClientConn

log = logging.getLogger("gateway.relay")

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class Hub:
    control_id = "control"

    def __init__(
        self,
        *,
        relay: RelaySettings,
        routing: RoutingSettings,
        pool: PoolSettings,
        registry: Registry,
        ledger: Ledger,
        control: Endpoint,
        spawn: Spawn,
        rng: random.Random | None = None,
    ) -> None:
        self.relay = relay
        self.routing = routing
        self.pool = pool
        self.registry = registry
        self.ledger = ledger
        self._spawn = spawn
        self._rng = rng or random.Random()
        self._ring = HashRing(())
        self._ring_version = -1
        self.upstreams: dict[str, Upstream] = {
            self.control_id: Upstream(self, self.control_id, control, relay)
        }
        self.clients: set[ClientConn] = set()
        self.no_clients = asyncio.Event()
        self.no_clients.set()
        self.loop = asyncio.get_running_loop()

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> None:
        self._spawn(coro, name)

    def now(self) -> float:
        return self.loop.time()

    # ---- placement -------------------------------------------------------------------------

    def new_placement(self, *, authority: str, client: str) -> ConnectionPlacement:
        return ConnectionPlacement(
            authority=authority,
            client=client or None,
            session_wait=self.routing.session_wait,
            hold_timeout=self.routing.hold_timeout,
        )

    def pick(self, key: str | None, *, internal: bool,
             ref: str) -> tuple[str, picking.Outcome] | None:
        snap = self.registry.snapshot
        candidates = snap.placeable()
        if not candidates:
            return None
        exclude = self.ledger.running_on(ref) if ref else frozenset()
        loads = self.ledger.loads()
        if internal or key is None or self.pool.loadbalance == "random":
            chosen = picking.two_choices(candidates, loads, self._rng, exclude=exclude)
            return None if chosen is None else (chosen, picking.Outcome.RANDOM)
        if snap.version != self._ring_version:
            self._ring = HashRing(candidates)
            self._ring_version = snap.version
        return picking.bounded(self._ring.walk(key), loads, c=self.pool.load_factor,
                               exclude=exclude)

    def owner(self, ref: str) -> str | None:
        return self.ledger.owner(ref)

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
        if replica_id == self.control_id:
            return
        self.registry.update(replica_id, ready=False, reason=reason)

    # ---- reports from connections ----------------------------------------------------------

    def client_opened(self, conn: ClientConn) -> None:
        self.clients.add(conn)
        self.no_clients.clear()

    def client_closed(self, conn: ClientConn) -> None:
        self.clients.discard(conn)
        if not self.clients:
            self.no_clients.set()

    def stream_opened(self, call: Call) -> None:
        pass

    def stream_closed(self, call: Call) -> None:
        pass

    def build_placed(self, placed: Placed, call: Call | None) -> None:
        self.ledger.start(placed.ref, placed.replica, internal=placed.internal, now=self.now())
        if call is not None:
            call.build = (placed.ref, placed.replica)
        log.debug("build placed", extra={"ref": placed.ref, "replica": placed.replica,
                                         "internal": placed.internal,
                                         "outcome": placed.outcome.value})

    def build_finished(self, call: Call, result: str) -> None:
        if call.build is None:
            return
        ref, replica = call.build
        call.build = None
        record = self.ledger.finish(ref, replica, result=result, now=self.now())
        if record is not None:
            log.info("build finished", extra={"ref": ref, "replica": replica,
                                              "internal": record.internal, "result": result,
                                              "duration_s": round(record.duration or 0, 3)})

    def call_failed(self, call: Call, err: errors.GatewayError) -> None:
        log.info("call failed", extra={"path": call.path, "code": errors.CODE_NAMES[err.code],
                                       "error": err.message})
