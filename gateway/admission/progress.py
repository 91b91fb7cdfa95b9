"""What a queued build shows in its own progress while it waits (pure).

The wait is one vertex of the build, `[gateway] waiting for a builder: <why>`, updated as the
queue moves and completed when the build is placed. `why` says what the build waits for: the
builds ahead of it, and the replicas being started for it when its pool has none serving (a
pool scaled to zero, or growing).
"""

from __future__ import annotations

WAIT_NAME = "[gateway] waiting for a builder"


def wait_label(*, ahead: int, starting: int, serving: int) -> str:
    """The text after the vertex name's colon."""
    if starting and not serving:
        replicas = f"starting {starting} replica{'s' if starting != 1 else ''}"
        return f"{replicas}, {ahead} ahead" if ahead else replicas
    return f"{ahead} ahead"
