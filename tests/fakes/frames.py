"""Parsed frames with named fields, for tests that read what the relay wrote.

`FrameReader.feed` hands out plain tuples (the hot path); `named` gives them field names."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from gateway.h2.frames import Frame


class Named(NamedTuple):
    type: int
    flags: int
    stream_id: int
    payload: memoryview
    flow_len: int


def named(frames: Iterable[Frame]) -> list[Named]:
    return [Named._make(f) for f in frames]
