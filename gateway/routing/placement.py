"""Build placement for one client connection (design.md, "Routing contract").

A build is Session + Solve + Status + LLBBridge calls that arrive on one HTTP/2 connection in any
order. This state machine decides, per client stream, which replica gets it:

- a build is placed when its Solve arrives: its Session, the shared sessions its attributes name,
  its Status (by Ref) and its LLBBridge calls (by buildid) go where it went;
- a stream that arrives before its Solve is held (unopened anywhere) until the Solve is placed,
  at most `hold_timeout`; then it goes to the Ref's finished owner, the bound replica, or the
  connection key's replica, so a history call or an orphan still gets an answer;
- the first non-internal build placed binds the connection: every later stream of the
  connection follows it. Internal builds (buildx's capability probe) go to any replica and do
  not bind. Non-internal Solves of an unbound connection are decided in arrival order;
- the sticky key comes from the Solve's Session (sharedkey); a Solve whose Session has not been
  seen waits for it at most `session_wait`, then uses the connection's fallback key.

Pure: time comes in as `now`, the pool comes in as a `Picker`, and every call returns the
decisions to carry out. Invariant: every stream handed in gets exactly one decision (Route or
Fail) unless `forget` is called for it first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.buildkit.wire import SolveInfo
from gateway.routing.key import placement_key
from gateway.routing.pick import Outcome


@dataclass(frozen=True, slots=True)
class Route:
    stream: int
    replica: str


@dataclass(frozen=True, slots=True)
class Placed:
    """A Solve placed: the ledger records the build (carried out before the Route)."""

    stream: int
    replica: str
    ref: str
    internal: bool
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Fail:
    stream: int
    message: str


Decision = Route | Placed | Fail


class Picker(Protocol):
    def __call__(self, key: str | None, *, internal: bool, ref: str) -> tuple[str, Outcome] | None:
        """A ready replica for a build (never one already running `ref`), or None."""


Owner = Callable[[str], str | None]  # replica that ran a finished Ref, if known


@dataclass(slots=True)
class _Held:
    kind: str  # "ref" or "session"
    key: str  # the Ref or the session id
    deadline: float
    sharedkey: str = ""


@dataclass(slots=True)
class _PendingSolve:
    stream: int
    info: SolveInfo
    deadline: float


NO_REPLICA = "no ready BuildKit replica is available"


class ConnectionPlacement:
    __slots__ = (
        "_authority",
        "_client",
        "_held",
        "_hold_timeout",
        "_pending",
        "_refs",
        "_session_keys",
        "_session_wait",
        "_sessions",
        "bound",
    )

    def __init__(
        self,
        *,
        authority: str,
        client: str | None,
        session_wait: float,
        hold_timeout: float,
    ) -> None:
        self._authority = authority
        self._client = client
        self._session_wait = session_wait
        self._hold_timeout = hold_timeout
        self.bound: str | None = None
        self._refs: dict[str, str] = {}  # Ref -> replica, builds placed from this connection
        self._sessions: dict[str, str] = {}  # session id -> replica
        self._session_keys: dict[str, str] = {}  # session id -> sharedkey, as seen
        self._held: dict[int, _Held] = {}
        self._pending: list[_PendingSolve] = []  # non-internal Solves awaiting their session

    # ---- events ----------------------------------------------------------------------------

    def session(self, stream: int, sid: str, sharedkey: str, now: float,
                pick: Picker) -> list[Decision]:
        self._session_keys[sid] = sharedkey
        target = self._sessions.get(sid) or self.bound
        if target is not None:
            return [Route(stream, target)]
        self._held[stream] = _Held("session", sid, now + self._hold_timeout, sharedkey)
        if self._pending and self._pending[0].info.session == sid:
            return self._decide_pending(pick, now)
        return []

    def solve(self, stream: int, info: SolveInfo, now: float, pick: Picker) -> list[Decision]:
        if self.bound is not None:
            return self._place(stream, info, self.bound, Outcome.BOUND)
        if info.internal:
            chosen = pick(None, internal=True, ref=info.ref)
            if chosen is None:
                return self._fail_build(stream, info)
            return self._place(stream, info, *chosen)
        self._pending.append(_PendingSolve(stream, info, now + self._session_wait))
        return self._decide_pending(pick, now)

    def follower(self, stream: int, ref: str, now: float, owner: Owner) -> list[Decision]:
        """A Status or LLBBridge call naming `ref`."""
        target = self._refs.get(ref) or owner(ref) or self.bound
        if target is not None:
            return [Route(stream, target)]
        self._held[stream] = _Held("ref", ref, now + self._hold_timeout)
        return []

    def other(self, stream: int, pick: Picker) -> list[Decision]:
        """A call outside any build (history, content, unknown methods)."""
        if self.bound is not None:
            return [Route(stream, self.bound)]
        chosen = pick(self._fallback_key(), internal=True, ref="")
        if chosen is None:
            return [Fail(stream, NO_REPLICA)]
        return [Route(stream, chosen[0])]

    def expire(self, now: float, pick: Picker, owner: Owner) -> list[Decision]:
        decisions = self._decide_pending(pick, now)
        for stream, held in list(self._held.items()):
            if held.deadline > now or stream not in self._held:
                continue
            del self._held[stream]
            target = self.bound
            if held.kind == "ref":
                target = target or owner(held.key)
            if target is None:
                key = self._fallback_key(held.sharedkey)
                chosen = pick(key, internal=True, ref="")
                if chosen is None:
                    decisions.append(Fail(stream, NO_REPLICA))
                    continue
                target = chosen[0]
            decisions.append(Route(stream, target))
        return decisions

    def deadline(self) -> float | None:
        times = [h.deadline for h in self._held.values()]
        if self._pending:
            times.append(self._pending[0].deadline)
        return min(times) if times else None

    def forget(self, stream: int) -> None:
        """The client dropped a stream that has no decision yet."""
        self._held.pop(stream, None)
        self._pending = [p for p in self._pending if p.stream != stream]

    def waiting(self) -> int:
        return len(self._held) + len(self._pending)

    # ---- internals -------------------------------------------------------------------------

    def _fallback_key(self, sharedkey: str = "") -> str | None:
        return placement_key(sharedkey=sharedkey, authority=self._authority, client=self._client)

    def _decide_pending(self, pick: Picker, now: float) -> list[Decision]:
        decisions: list[Decision] = []
        while self._pending and self.bound is None:
            head = self._pending[0]
            sid = head.info.session
            known = sid in self._session_keys
            if not known and head.deadline > now:
                break
            self._pending.pop(0)
            key = self._fallback_key(self._session_keys.get(sid, ""))
            chosen = pick(key, internal=False, ref=head.info.ref)
            if chosen is None:
                decisions += self._fail_build(head.stream, head.info)
                continue
            replica, outcome = chosen
            self.bound = replica
            decisions += self._place(head.stream, head.info, replica, outcome)
            decisions += self._release_all(replica)
        if self.bound is not None:
            while self._pending:
                head = self._pending.pop(0)
                decisions += self._place(head.stream, head.info, self.bound, Outcome.BOUND)
        return decisions

    def _place(self, stream: int, info: SolveInfo, replica: str,
               outcome: Outcome) -> list[Decision]:
        self._refs[info.ref] = replica
        for sid in info.sessions():
            self._sessions.setdefault(sid, replica)
        decisions: list[Decision] = [
            Placed(stream, replica, info.ref, info.internal, outcome),
            Route(stream, replica),
        ]
        for held_stream, held in list(self._held.items()):
            target = (self._refs if held.kind == "ref" else self._sessions).get(held.key)
            if target is not None:
                del self._held[held_stream]
                decisions.append(Route(held_stream, target))
        return decisions

    def _release_all(self, replica: str) -> list[Decision]:
        decisions: list[Decision] = [Route(s, replica) for s in self._held]
        self._held.clear()
        return decisions

    def _fail_build(self, stream: int, info: SolveInfo) -> list[Decision]:
        decisions: list[Decision] = [Fail(stream, NO_REPLICA)]
        names = set(info.sessions())
        for held_stream, held in list(self._held.items()):
            if (held.kind == "ref" and held.key == info.ref) or (
                held.kind == "session" and held.key in names
            ):
                del self._held[held_stream]
                decisions.append(Fail(held_stream, NO_REPLICA))
        return decisions
