"""Build placement for one client connection (design.md, "Routing contract").

A build is Session + Solve + Status + LLBBridge calls that arrive on one HTTP/2 connection in any
order. This state machine decides, per client stream, which replica gets it:

- a build is placed when its Solve arrives: its Session, the shared sessions its attributes name,
  its Status (by Ref) and its LLBBridge calls (by buildid) go where it went;
- a stream that arrives before its Solve is held (unopened anywhere) until the Solve is placed.
  A Session waits as long as it takes; a Status or LLBBridge call at most `hold_timeout` unless
  a Solve that names it is already here (waiting for its session or queued for a slot); then it
  goes to where the Ref is known to be (`locate`) or the bound replica, else it is `Unlocated`
  (the shell asks the replicas' history, or answers "no such job");
- the first non-internal build placed binds the connection: every later stream of the
  connection follows it. Internal builds (buildx's capability probe) go to any replica and do
  not bind. Non-internal Solves of an unbound connection are decided in arrival order;
- the sticky key comes from the Solve's Session (sharedkey); a Solve whose Session has not been
  seen waits for it at most `session_wait`, then uses the connection's fallback key;
- when the picker has no free slot (`WAIT`), the build is queued (`Enqueue`); the shell later
  calls `admitted` or `reject`. Streams that join a queued build are reported (`Waiting`) so
  the shell can show the wait in the build's progress.

Pure: time comes in as `now`, the pool comes in as a `Picker`, and every call returns the
decisions to carry out. Invariant: every stream handed in gets exactly one final decision (Route
or Fail) unless `forget` is called for it first.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway import errors
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
    error: errors.GatewayError


@dataclass(frozen=True, slots=True)
class Enqueue:
    """No slot now: the Solve waits in the pool's admission queue."""

    stream: int
    ref: str
    internal: bool
    key: str | None
    target: str | None  # the bound replica it must wait for, if any


@dataclass(frozen=True, slots=True)
class Waiting:
    """A held stream belongs to a queued build (its Status shows the wait)."""

    stream: int
    ref: str


@dataclass(frozen=True, slots=True)
class Unlocated:
    """A held call names a Ref that no Solve here placed and nothing else locates."""

    stream: int
    ref: str


Decision = Route | Placed | Fail | Enqueue | Waiting | Unlocated


class Wait(enum.Enum):
    """Picker answer: nothing free now, the build may wait for a slot."""

    WAIT = "wait"


WAIT = Wait.WAIT
Pick = tuple[str, Outcome] | Wait | None  # placed, wait for a slot, impossible


class Picker(Protocol):
    def __call__(self, key: str | None, *, internal: bool, ref: str,
                 target: str | None = None) -> Pick:
        """A replica for a build (never one already running `ref`).

        With `target`, that replica or nothing. None means it can never be placed (the target
        left the pool); WAIT means no slot is free now.
        """


Locate = Callable[[str], str | None]  # replica known to run or to have run a Ref


@dataclass(slots=True)
class _Held:
    kind: str  # "ref" or "session"
    key: str  # the Ref or the session id
    deadline: float  # math.inf for sessions, and while a Solve that names it is here


@dataclass(slots=True)
class _Solve:
    stream: int
    info: SolveInfo
    deadline: float  # for a pending Solve: how long it waits for its session


NO_REPLICA = "no ready BuildKit replica is available"


class ConnectionPlacement:
    __slots__ = (
        "_authority",
        "_binding_queued",
        "_client",
        "_held",
        "_hold_timeout",
        "_pending",
        "_queued",
        "_refs",
        "_session_keys",
        "_session_wait",
        "_sessions",
        "bound",
        "history_replica",
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
        self.history_replica: str | None = None  # where this connection's last history call went
        self._refs: dict[str, str] = {}  # Ref -> replica, builds placed from this connection
        self._sessions: dict[str, str] = {}  # session id -> replica
        self._session_keys: dict[str, str] = {}  # session id -> sharedkey, as seen
        self._held: dict[int, _Held] = {}
        self._pending: list[_Solve] = []  # non-internal Solves not decided yet (arrival order)
        self._queued: dict[int, _Solve] = {}  # Solves waiting in the admission queue
        self._binding_queued = False  # the Solve that will bind the connection is queued

    # ---- events ----------------------------------------------------------------------------

    def session(self, stream: int, sid: str, sharedkey: str, now: float,
                pick: Picker) -> list[Decision]:
        self._session_keys[sid] = sharedkey
        target = self._sessions.get(sid) or self.bound
        if target is not None:
            return [Route(stream, target)]
        # A session waits for the Solve that names it however long that takes: it costs
        # nothing while held, and routing it by a fallback could split the build.
        self._held[stream] = _Held("session", sid, math.inf)
        if self._pending and not self._binding_queued and self._pending[0].info.session == sid:
            return self._decide_pending(pick, now)
        return []

    def solve(self, stream: int, info: SolveInfo, now: float, pick: Picker) -> list[Decision]:
        if self.bound is not None:
            chosen = pick(None, internal=info.internal, ref=info.ref, target=self.bound)
            return self._settle(_Solve(stream, info, now), chosen, None, self.bound)
        if info.internal:
            chosen = pick(None, internal=True, ref=info.ref)
            return self._settle(_Solve(stream, info, now), chosen, None, None)
        self._pending.append(_Solve(stream, info, now + self._session_wait))
        self._claim(info)
        return self._decide_pending(pick, now)

    def follower(self, stream: int, ref: str, now: float, locate: Locate) -> list[Decision]:
        """A Status or LLBBridge call naming `ref`."""
        target = self._refs.get(ref)
        if target is not None:
            return [Route(stream, target)]
        if self._claims("ref", ref):
            self._held[stream] = _Held("ref", ref, math.inf)
            if any(q.info.ref == ref for q in self._queued.values()):
                return [Waiting(stream, ref)]
            return []
        target = locate(ref) or self.bound
        if target is not None:
            return [Route(stream, target)]
        self._held[stream] = _Held("ref", ref, now + self._hold_timeout)
        return []

    def other_target(self) -> str | None:
        """Where `other` routes without a pick: the last history call's replica, else the
        bound one (None: `other` picks)."""
        return self.history_replica or self.bound

    def other(self, stream: int, pick: Picker) -> list[Decision]:
        """A call outside any build (content, traces, unknown methods).

        Content reads follow the connection's last history call (buildx reads the blobs of
        the build it just looked up), else the bound replica, else the connection key's.
        """
        target = self.other_target()
        if target is not None:
            return [Route(stream, target)]
        chosen = pick(None, internal=True, ref="")  # internal picks take no key: two choices
        if not isinstance(chosen, tuple):
            return [Fail(stream, errors.NoReplica(NO_REPLICA))]
        return [Route(stream, chosen[0])]

    def admitted(self, stream: int, replica: str, outcome: Outcome, now: float,
                 pick: Picker) -> list[Decision]:
        """The admission queue found a slot for a queued Solve."""
        entry = self._queued.pop(stream, None)
        if entry is None:
            return []
        decisions: list[Decision] = []
        if not entry.info.internal and self.bound is None:
            self.bound = replica
            self._binding_queued = False
            decisions += self._place(entry, replica, outcome)
            decisions += self._release_all(replica)
            decisions += self._decide_pending(pick, now)
        else:
            decisions += self._place(entry, replica, outcome)
        return decisions

    def reject(self, stream: int, error: errors.GatewayError, now: float,
               pick: Picker) -> list[Decision]:
        """The admission queue refused a queued Solve (full, or waited too long)."""
        entry = self._queued.pop(stream, None)
        if entry is None:
            return []
        decisions = self._fail_build(entry, error)
        if not entry.info.internal and self.bound is None:
            self._binding_queued = False
            decisions += self._decide_pending(pick, now)
        return decisions

    def expire(self, now: float, pick: Picker, locate: Locate) -> list[Decision]:
        decisions = self._decide_pending(pick, now)
        for stream, held in list(self._held.items()):
            if held.deadline > now or stream not in self._held:
                continue
            del self._held[stream]  # only Status/LLBBridge calls expire (sessions wait)
            target = locate(held.key) or self.bound
            decisions.append(Route(stream, target) if target else Unlocated(stream, held.key))
        return decisions

    def deadline(self) -> float | None:
        """When `expire` has work; -inf when a pending Solve can be decided right away."""
        times = [h.deadline for h in self._held.values() if h.deadline != math.inf]
        if self._pending and not self._binding_queued:
            head = self._pending[0]
            known = head.info.session in self._session_keys
            times.append(-math.inf if known else head.deadline)
        return min(times) if times else None

    def forget(self, stream: int, now: float) -> None:
        """The client dropped a stream that has no final decision yet."""
        self._held.pop(stream, None)
        dropped = [p for p in self._pending if p.stream == stream]
        self._pending = [p for p in self._pending if p.stream != stream]
        entry = self._queued.pop(stream, None)
        if entry is not None:
            dropped.append(entry)
            if not entry.info.internal and self.bound is None:
                self._binding_queued = False
        if dropped:  # calls it claimed wait for their own deadline again
            for held in self._held.values():
                if (held.kind == "ref" and held.deadline == math.inf
                        and not self._claims("ref", held.key)):
                    held.deadline = now + self._hold_timeout

    def waiting(self) -> int:
        return len(self._held) + len(self._pending) + len(self._queued)

    def queued_streams(self) -> list[int]:
        return list(self._queued)

    # ---- internals -------------------------------------------------------------------------

    def _fallback_key(self, sharedkey: str = "") -> str | None:
        return placement_key(sharedkey=sharedkey, authority=self._authority, client=self._client)

    def _claims(self, kind: str, key: str, *, queued_only: bool = False) -> bool:
        """Whether a Solve here (pending or queued) names this Ref or session."""
        entries = self._queued.values() if queued_only else (*self._pending,
                                                             *self._queued.values())
        for entry in entries:
            if kind == "ref" and entry.info.ref == key:
                return True
            if kind == "session" and key in entry.info.sessions():
                return True
        return False

    def _claim(self, info: SolveInfo) -> None:
        names = set(info.sessions())
        for held in self._held.values():
            if (held.kind == "ref" and held.key == info.ref) or (
                held.kind == "session" and held.key in names
            ):
                held.deadline = math.inf

    def _settle(self, entry: _Solve, chosen: Pick, key: str | None,
                target: str | None) -> list[Decision]:
        """Carries out a pick for a Solve: place it, queue it, or fail it."""
        if isinstance(chosen, tuple):
            return self._place(entry, *chosen)
        if chosen is None:
            return self._fail_build(entry, errors.NoReplica(
                f"BuildKit replica {target} of this connection is no longer available"
                if target else NO_REPLICA))
        self._queued[entry.stream] = entry
        self._claim(entry.info)
        decisions: list[Decision] = [
            Enqueue(entry.stream, entry.info.ref, entry.info.internal, key, target)]
        decisions += [Waiting(s, h.key) for s, h in self._held.items()
                      if h.kind == "ref" and h.key == entry.info.ref]
        return decisions

    def _decide_pending(self, pick: Picker, now: float) -> list[Decision]:
        decisions: list[Decision] = []
        while self._pending and self.bound is None and not self._binding_queued:
            head = self._pending[0]
            sid = head.info.session
            if sid not in self._session_keys and head.deadline > now:
                break
            self._pending.pop(0)
            key = self._fallback_key(self._session_keys.get(sid, ""))
            chosen = pick(key, internal=False, ref=head.info.ref)
            if isinstance(chosen, tuple):
                replica, outcome = chosen
                self.bound = replica
                decisions += self._place(head, replica, outcome)
                decisions += self._release_all(replica)
            else:
                decisions += self._settle(head, chosen, key, None)
                if chosen is WAIT:
                    self._binding_queued = True
        if self.bound is not None:
            while self._pending:
                head = self._pending.pop(0)
                chosen = pick(None, internal=False, ref=head.info.ref, target=self.bound)
                decisions += self._settle(head, chosen, None, self.bound)
        return decisions

    def _place(self, entry: _Solve, replica: str, outcome: Outcome) -> list[Decision]:
        info = entry.info
        self._refs[info.ref] = replica
        for sid in info.sessions():
            self._sessions.setdefault(sid, replica)
        decisions: list[Decision] = [
            Placed(entry.stream, replica, info.ref, info.internal, outcome),
            Route(entry.stream, replica),
        ]
        for held_stream, held in list(self._held.items()):
            target = (self._refs if held.kind == "ref" else self._sessions).get(held.key)
            if target is not None:
                del self._held[held_stream]
                decisions.append(Route(held_stream, target))
        return decisions

    def _release_all(self, replica: str) -> list[Decision]:
        """The connection just bound: held streams follow, except those of queued builds."""
        decisions: list[Decision] = []
        for stream, held in list(self._held.items()):
            if not self._claims(held.kind, held.key, queued_only=True):
                del self._held[stream]
                decisions.append(Route(stream, replica))
        return decisions

    def _fail_build(self, entry: _Solve, error: errors.GatewayError) -> list[Decision]:
        decisions: list[Decision] = [Fail(entry.stream, error)]
        names = set(entry.info.sessions())
        for held_stream, held in list(self._held.items()):
            if (held.kind == "ref" and held.key == entry.info.ref) or (
                held.kind == "session" and held.key in names and not self._claims(
                    "session", held.key)
            ):
                del self._held[held_stream]
                decisions.append(Fail(held_stream, error))
        return decisions
