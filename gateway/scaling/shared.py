"""Several gateways, one scaler: the election and the demand they share (pure).

Design: every gateway routes alike (the ring is a function of the ready pods), but exactly one
scales: the holder of the Lease `--kube-lease`. The others publish their demand (per pool:
builds running, builds queued, the pods those keep busy) in a Lease of their own,
`<lease>-<identity>`, renewed every fifth of the lease duration; the leader adds the fresh ones
to its own demand before every decision.

Time, as client-go's leader election does it: a Lease is judged by when this gateway saw it
change (its resourceVersion), on this gateway's monotonic clock, never by the timestamps
written in it, so clocks that differ between nodes do not matter. A holder whose Lease has not
changed for its duration is gone: the Lease may be taken, its demand no longer counts. A
gateway that starts counts every Lease as just seen (a dead gateway's demand may count for one
duration more: it errs toward more replicas, never toward removing a busy one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DEMAND_ANNOTATION = "buildkit-gateway/demand"
"""The annotation of a gateway's own Lease that holds its demand (JSON, per pool)."""
AFFINITY_ANNOTATION = "buildkit-gateway/affinity"
"""The annotation of a gateway's own Lease that holds its recent cache-affinity entries (JSON
rows of routing/affinity.py)."""
GROUP_LABEL = "buildkit-gateway/lease"
"""The label of every gateway's demand Lease: the election Lease's name (to list them)."""


@dataclass(frozen=True, slots=True)
class Demand:
    """A pool's builds as the scaler counts them."""

    running: int  # non-internal builds placed
    queued: int  # builds (and calls at an empty pool) waiting for a replica
    busy: frozenset[str]  # replicas that run a build, or that a queued build waits for


NO_DEMAND = Demand(0, 0, frozenset())


def total(own: Demand, others: Iterable[Demand]) -> Demand:
    """Every gateway's demand for one pool."""
    running, queued, busy = own.running, own.queued, set(own.busy)
    for d in others:
        running += d.running
        queued += d.queued
        busy |= d.busy
    return Demand(running, queued, frozenset(busy))


def encode_demand(demand: Mapping[str, Demand]) -> str:
    return json.dumps({pool: {"running": d.running, "queued": d.queued,
                              "busy": sorted(d.busy)} for pool, d in sorted(demand.items())},
                      separators=(",", ":"))


def decode_demand(text: str | None) -> dict[str, Demand]:
    """A peer's demand; what does not parse counts as none (a peer's bug must not stop the
    scaler)."""
    try:
        data = json.loads(text or "{}")
        return {str(pool): Demand(max(0, int(d.get("running", 0))),
                                  max(0, int(d.get("queued", 0))),
                                  frozenset(str(b) for b in d.get("busy", ())))
                for pool, d in data.items()}
    except (ValueError, TypeError, AttributeError):
        return {}


@dataclass(frozen=True, slots=True)
class Record:
    """A Lease as read: its holder, duration and version (which every write changes)."""

    holder: str
    duration: float
    version: str


@dataclass(frozen=True, slots=True)
class Seen:
    """A Lease and when (this gateway's monotonic time) it was seen to change last."""

    record: Record
    at: float

    def expired(self, now: float) -> bool:
        return now >= self.at + self.record.duration


def observe(previous: Seen | None, record: Record, now: float) -> Seen:
    """The Lease read now: `previous` if it has not changed since."""
    if previous is not None and previous.record == record:
        return previous
    return Seen(record, now)


def may_lead(seen: Seen | None, identity: str, now: float) -> bool:
    """Whether this gateway may write itself as holder: no Lease yet, no holder (released),
    already ours, or the holder's Lease unchanged for its duration."""
    return (seen is None or not seen.record.holder or seen.record.holder == identity
            or seen.expired(now))


def demand_lease_name(lease: str, identity: str) -> str:
    """`<lease>-<identity>` made a valid object name (lower case, [a-z0-9.-], <= 253)."""
    name = re.sub(r"[^a-z0-9.-]+", "-", f"{lease}-{identity}".lower()).strip("-.")
    return name[:253].rstrip("-.")
