"""Frames and header blocks for tests.

`FrameReader.feed` hands out plain tuples (the hot path); `named` gives them field names, for
tests that read what the relay wrote. `fresh_block` is a header block a fresh decoder reads."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from gateway.h2.frames import Frame
from gateway.h2.headers import HeaderEncoder, Headers


class Named(NamedTuple):
    type: int
    flags: int
    stream_id: int
    payload: memoryview
    flow_len: int


def named(frames: Iterable[Frame]) -> list[Named]:
    return [Named._make(f) for f in frames]


def fresh_block(headers: Headers) -> bytes:
    """The block of `headers` from a fresh table encoder (as a peer's first block)."""
    return HeaderEncoder().encode(headers)
