"""Identifiers shaped like the ones BuildKit clients generate.

`new_id` follows moby/buildkit `identity.NewID`: 17 random bytes with the top bit set, written
in base 36, characters [1:26]. Setting the top bit fixes the length of the base-36 text, so the
result is always exactly 25 lowercase base-36 characters (used for build Refs and session IDs).
`node_id` follows buildx `confutil.TryNodeIdentifier`: 8 random bytes in hex (the `:<nodeID>`
suffix of a session sharedkey).
"""

from __future__ import annotations

import random
import secrets

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_ENTROPY_BYTES = 17
_ID_LENGTH = 25


def _base36(n: int) -> str:
    out: list[str] = []
    while n:
        n, r = divmod(n, 36)
        out.append(_DIGITS[r])
    return "".join(reversed(out)) or "0"


def _random_bytes(n: int, rng: random.Random | None) -> bytes:
    return rng.randbytes(n) if rng is not None else secrets.token_bytes(n)


def new_id(rng: random.Random | None = None) -> str:
    """A 25-char lowercase base-36 random ID (pass `rng` for reproducible IDs)."""
    raw = bytearray(_random_bytes(_ENTROPY_BYTES, rng))
    raw[0] |= 0x80
    return _base36(int.from_bytes(raw, "big"))[1 : _ID_LENGTH + 1]


def node_id(rng: random.Random | None = None) -> str:
    """16 lowercase hex chars, like buildx's `.buildNodeID`."""
    return _random_bytes(8, rng).hex()
