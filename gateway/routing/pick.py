"""Choosing a replica: sticky with bounded loads, or random with two choices.

Design: pure functions over a candidate order and a load map (active non-internal builds per
replica). Sticky walks the ring from the key and takes the first replica whose load is below
ceil(c x average), counting the build being placed, so a hot key spills to its ring neighbours
instead of piling up (Mirrokni et al., "Consistent Hashing with Bounded Loads"). Random takes
the less loaded of two distinct random candidates. Neither reads a clock or does I/O.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Collection, Mapping, Sequence


class Outcome(enum.Enum):
    PRIMARY = "primary"  # the key's own replica
    SPILL = "spill"  # a ring neighbour: the key's replica was over the load bound
    RANDOM = "random"  # no key, random policy, or internal build
    BOUND = "bound"  # followed the connection's binding


def bounded(
    order: Sequence[str],
    loads: Mapping[str, int],
    *,
    c: float,
    exclude: Collection[str] = (),
) -> tuple[str, Outcome] | None:
    candidates = [n for n in order if n not in exclude]
    if not candidates:
        return None
    total = sum(loads.get(n, 0) for n in candidates) + 1
    cap = math.ceil(c * total / len(candidates))
    for i, node in enumerate(candidates):
        if loads.get(node, 0) < cap:
            return node, Outcome.PRIMARY if i == 0 else Outcome.SPILL
    return candidates[0], Outcome.PRIMARY  # unreachable: some node is below the average


def two_choices(
    candidates: Sequence[str],
    loads: Mapping[str, int],
    rng: random.Random,
    *,
    exclude: Collection[str] = (),
) -> str | None:
    pool = [n for n in candidates if n not in exclude]
    if not pool:
        return None
    if len(pool) == 1:
        return pool[0]
    a, b = rng.sample(pool, 2)
    return a if loads.get(a, 0) <= loads.get(b, 0) else b
