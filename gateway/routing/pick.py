"""Choosing a replica: sticky with bounded loads, or random with two choices.

Design: pure functions over candidates and a load map (active non-internal builds per replica).
A replica is *open* to a build when it is not excluded (it already runs the build's Ref) and,
with a slot limit, runs fewer builds than the limit. Sticky walks the ring from the key and
takes the first open replica whose load is below ceil(c x average), the average taken over the
open replicas counting the build being placed, so a hot key spills to its ring neighbours
instead of piling up (Mirrokni et al., "Consistent Hashing with Bounded Loads"). Since some open
replica is at most at the average, the walk always finds one. Random takes the less loaded of
two distinct random open candidates. Neither reads a clock or does I/O.

Cost: nothing here scans every candidate on the common path. The caller passes the open
replicas' count and load (kept as running totals by the ledger, `Ledger.tally`); `bounded`
consumes the lazy ring walk only up to the replica it takes; `two_choices` draws by index and
scans only when a bounded number of draws found no two open candidates.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Container, Iterable, Mapping, Sequence


class Outcome(enum.Enum):
    PRIMARY = "primary"  # the key's own replica (the first open one on its walk)
    SPILL = "spill"  # a ring neighbour: the key's replica was over the load bound
    RANDOM = "random"  # no key, random policy, or internal build
    BOUND = "bound"  # followed the connection's binding
    AFFINITY = "affinity"  # the replica that last ran the key, away from its ring place


DRAWS = 16  # two_choices: random draws before it falls back to a scan


def is_open(node: str, loads: Mapping[str, int], *, exclude: Container[str],
            limit: int) -> bool:
    """Not excluded and, with a slot limit (0: none), below it."""
    return node not in exclude and (not limit or loads.get(node, 0) < limit)


def open_share(tally: tuple[int, int], members: Container[str], loads: Mapping[str, int], *,
               exclude: Iterable[str], limit: int) -> tuple[int, int]:
    """(open replicas, builds they run) of a replica set, from the set's `tally` (the same pair
    without exclusions: `Ledger.tally`) less its open members in `exclude`. O(len(exclude))."""
    count, load = tally
    for node in exclude:
        if node in members and (not limit or loads.get(node, 0) < limit):
            count -= 1
            load -= loads.get(node, 0)
    return count, load


def load_cap(*, load: int, count: int, c: float) -> int:
    """ceil(c x average): the bound an open replica's load must be below to take the build,
    `load` being what the `count` open replicas run, the build being placed counted in."""
    return math.ceil(c * (load + 1) / count)


def bounded(
    walk: Iterable[str],
    loads: Mapping[str, int],
    *,
    cap: int,
    exclude: Container[str] = (),
    limit: int = 0,
) -> tuple[str, Outcome] | None:
    """The first open node of `walk` whose load is below `cap`: PRIMARY if it is the first
    open node, SPILL otherwise; None if there is none (never, when `cap` is load_cap over the
    open nodes of a walk that has them all). Stops consuming `walk` there."""
    first = True
    for node in walk:
        load = loads.get(node, 0)
        if node in exclude or (limit and load >= limit):  # not open (is_open, inlined)
            continue
        if load < cap:
            return node, Outcome.PRIMARY if first else Outcome.SPILL
        first = False
    return None


def two_choices(
    candidates: Sequence[str],
    loads: Mapping[str, int],
    rng: random.Random,
    *,
    exclude: Container[str] = (),
    limit: int = 0,
) -> str | None:
    """The less loaded of two distinct open candidates drawn uniformly at random (the first
    drawn on a tie); the only open one; or None.

    Draws indexes, redrawing a closed or repeated candidate, up to DRAWS draws; then scans
    for the open ones and samples two. Either way every ordered pair of open candidates is
    equally likely, so the scan is a fallback, not a bias: it runs when open candidates are
    scarce (e.g. most replicas at their slot limit). With nothing to exclude and no limit
    every candidate is open: two distinct indexes are drawn directly (calls outside builds,
    where one or two replicas would otherwise take up to DRAWS draws)."""
    n = len(candidates)
    if not n:
        return None
    if not exclude and not limit:
        if n == 1:
            return candidates[0]
        rand = rng.random
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        return _lighter(candidates[i], candidates[j + (j >= i)], loads)
    drawn: list[str] = []
    for _ in range(DRAWS):
        node = candidates[rng.randrange(len(candidates))]
        if node not in drawn and is_open(node, loads, exclude=exclude, limit=limit):
            drawn.append(node)
            if len(drawn) == 2:
                return _lighter(drawn[0], drawn[1], loads)
    pool = [n for n in candidates if is_open(n, loads, exclude=exclude, limit=limit)]
    if len(pool) < 2:
        return pool[0] if pool else None
    a, b = rng.sample(pool, 2)
    return _lighter(a, b, loads)


def _lighter(a: str, b: str, loads: Mapping[str, int]) -> str:
    return a if loads.get(a, 0) <= loads.get(b, 0) else b
