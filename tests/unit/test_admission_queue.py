"""gateway/admission/queue.py: the FIFO admission queue of one pool (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admission.queue import AdmissionQueue, Waiter


def waiter(ref: str = "r", *, target: str | None = None, internal: bool = False,
           key: str | None = None) -> Waiter:
    return Waiter(ref, internal, key, target, enqueued=-1.0, deadline=-1.0)


def queue(*waiters: Waiter, now: float = 0.0, max_queue: int = 100,
          timeout: float = 60.0) -> AdmissionQueue:
    q = AdmissionQueue(max_queue=max_queue, timeout=timeout)
    for w in waiters:
        assert q.offer(w, now)
    return q


def refs(q: AdmissionQueue) -> list[str]:
    return [w.ref for w in q]


def test_offer_stamps_ticket_enqueued_and_deadline() -> None:
    q = AdmissionQueue(max_queue=10, timeout=30.0)
    a, b = waiter("a"), waiter("b")
    assert q.offer(a, 5.0)
    assert q.offer(b, 7.5)
    assert (a.enqueued, a.deadline) == (5.0, 35.0)
    assert (b.enqueued, b.deadline) == (7.5, 37.5)
    assert a.ticket > 0 and b.ticket > a.ticket
    assert len(q) == 2
    assert list(q) == [a, b]


def test_offer_refuses_when_the_queue_is_full() -> None:
    a, b, c = waiter("a"), waiter("b"), waiter("c")
    q = queue(a, b, max_queue=2)
    assert not q.offer(c, 1.0)
    assert len(q) == 2
    assert c.ticket == 0  # not stamped
    assert c.deadline == -1.0
    assert q.remove(a.ticket) is a
    assert q.offer(c, 2.0)
    assert refs(q) == ["b", "c"]
    assert c.ticket not in (a.ticket, b.ticket)  # tickets are never reused


def test_max_queue_zero_refuses_everything() -> None:
    q = AdmissionQueue(max_queue=0, timeout=1.0)
    assert not q.offer(waiter(), 0.0)
    assert len(q) == 0


def test_admit_walks_in_fifo_order_and_keeps_the_others_in_order() -> None:
    ws = [waiter(f"w{i}") for i in range(5)]
    q = queue(*ws)
    asked: list[str] = []

    def place(w: Waiter) -> str | None:
        asked.append(w.ref)
        return {"w1": "A", "w3": "B"}.get(w.ref)

    assert q.admit(place) == [(ws[1], "A"), (ws[3], "B")]
    assert asked == ["w0", "w1", "w2", "w3", "w4"]
    assert refs(q) == ["w0", "w2", "w4"]
    assert q.positions() == {ws[0].ticket: 0, ws[2].ticket: 1, ws[4].ticket: 2}


def test_admit_with_nothing_free_keeps_everyone() -> None:
    ws = [waiter(f"w{i}") for i in range(3)]
    q = queue(*ws)
    assert q.admit(lambda w: None) == []
    assert list(q) == ws


def test_admit_on_an_empty_queue_asks_nobody() -> None:
    q = AdmissionQueue(max_queue=5, timeout=1.0)
    asked: list[Waiter] = []
    assert q.admit(lambda w: asked.append(w)) == []
    assert asked == []


def test_admit_everyone_empties_the_queue() -> None:
    ws = [waiter(f"w{i}") for i in range(3)]
    q = queue(*ws)
    assert q.admit(lambda w: "A") == [(w, "A") for w in ws]
    assert len(q) == 0
    assert q.next_deadline() is None
    assert q.positions() == {}


def test_ahead_and_positions() -> None:
    a, b, c = waiter("a"), waiter("b"), waiter("c")
    q = queue(a, b, c)
    assert [q.ahead(w.ticket) for w in (a, b, c)] == [0, 1, 2]
    assert q.positions() == {a.ticket: 0, b.ticket: 1, c.ticket: 2}
    q.remove(a.ticket)
    assert [q.ahead(w.ticket) for w in (b, c)] == [0, 1]
    assert q.positions() == {b.ticket: 0, c.ticket: 1}
    d = waiter("d")
    q.offer(d, 1.0)
    assert q.ahead(d.ticket) == 2


def test_remove() -> None:
    a, b = waiter("a"), waiter("b")
    q = queue(a, b)
    assert q.remove(b.ticket) is b
    assert q.remove(b.ticket) is None
    assert q.remove(12345) is None
    assert list(q) == [a]


def test_expire_by_deadline() -> None:
    q = AdmissionQueue(max_queue=10, timeout=10.0)
    a, b, c = waiter("a"), waiter("b"), waiter("c")
    q.offer(a, 0.0)
    q.offer(b, 3.0)
    q.offer(c, 3.0)
    assert q.next_deadline() == 10.0
    assert q.expire(9.99) == []
    assert q.expire(10.0) == [a]  # a deadline is inclusive
    assert refs(q) == ["b", "c"]
    assert q.next_deadline() == 13.0
    assert q.expire(20.0) == [b, c]
    assert len(q) == 0
    assert q.next_deadline() is None


def test_next_deadline_after_remove() -> None:
    q = AdmissionQueue(max_queue=10, timeout=10.0)
    a, b = waiter("a"), waiter("b")
    q.offer(a, 5.0)
    q.offer(b, 6.0)
    assert q.next_deadline() == 15.0
    q.remove(a.ticket)
    assert q.next_deadline() == 16.0
    assert q.expire(15.5) == []
    assert q.expire(16.0) == [b]


def test_a_constrained_waiter_does_not_block_a_later_unconstrained_one() -> None:
    bound = waiter("bound", target="A")  # a bound connection waits for replica A
    free = waiter("free")
    q = queue(bound, free)
    slots = {"A": 0, "B": 1}

    def place(w: Waiter) -> str | None:
        choices = [w.target] if w.target else sorted(slots)
        for r in choices:
            if slots[r] > 0:
                slots[r] -= 1
                return r
        return None

    assert q.admit(place) == [(free, "B")]
    assert list(q) == [bound]
    assert q.ahead(bound.ticket) == 0
    slots["A"] = 1
    assert q.admit(place) == [(bound, "A")]
    assert len(q) == 0


def test_an_unconstrained_waiter_goes_before_a_later_constrained_one() -> None:
    free = waiter("free")
    bound = waiter("bound", target="A")
    q = queue(free, bound)
    slots = {"A": 1}

    def place(w: Waiter) -> str | None:
        if slots["A"] > 0:
            slots["A"] -= 1
            return "A"
        return None

    assert q.admit(place) == [(free, "A")]
    assert list(q) == [bound]


def test_a_waiter_offered_while_admit_walks_is_kept_for_a_later_walk() -> None:
    # the shell's place() may queue follow-up builds (admitted -> a bound Solve waits)
    a, b = waiter("a"), waiter("b")
    q = queue(a, b, max_queue=5)
    follow = waiter("follow", target="A")
    asked: list[str] = []

    def place(w: Waiter) -> str | None:
        asked.append(w.ref)
        if w is a:
            assert q.offer(follow, 1.0)
            return "A"
        return None

    assert q.admit(place) == [(a, "A")]
    assert asked == ["a", "b"]  # not asked in the walk that queued it
    assert list(q) == [b, follow]


def test_a_waiter_being_placed_no_longer_counts_against_max_queue() -> None:
    a = waiter("a")
    q = queue(a, max_queue=1)
    follow = waiter("follow", target="A")
    offered: list[bool] = []

    def place(w: Waiter) -> str | None:
        if w is a:
            offered.append(q.offer(follow, 1.0))
            return "A"
        return None

    assert q.admit(place) == [(a, "A")]
    assert offered == [True]
    assert list(q) == [follow]


# ---- property: FIFO among equals ------------------------------------------------------------

REPLICAS = ("A", "B", "C")


def _can_place(w: Waiter, free: dict[str, int], pool: tuple[str, ...]) -> str | None:
    """The slot model of the shell's place(): internal builds need no slot; a bound one needs
    its own replica; any other takes the first replica with a free slot."""
    if w.internal:
        if w.target is not None:
            return w.target if w.target in pool else None
        return pool[0] if pool else None
    candidates = [w.target] if w.target is not None else list(pool)
    return next((r for r in candidates if r in pool and free[r] > 0), None)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.sampled_from([None, None, *REPLICAS]), st.booleans()),
        st.tuples(st.just("free"), st.sampled_from(REPLICAS)),
        st.tuples(st.just("admit")),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, pool_size=st.integers(0, 3), initial=st.lists(st.integers(0, 2), min_size=3,
                                                               max_size=3))
def test_no_waiter_is_placed_ahead_of_an_earlier_one_it_could_have_gone_to(
    ops: list[tuple], pool_size: int, initial: list[int]
) -> None:
    pool = REPLICAS[:pool_size]
    free = dict(zip(REPLICAS, initial, strict=True))
    q = AdmissionQueue(max_queue=8, timeout=1000.0)
    now = 0.0
    n = 0
    for op in ops:
        now += 1.0
        if op[0] == "offer":
            _, target, internal = op
            n += 1
            before = len(q)
            w = waiter(f"w{n}", target=target, internal=internal)
            assert q.offer(w, now) == (before < 8)
            assert len(q) == min(before + 1, 8)
        elif op[0] == "free":
            free[op[1]] += 1
        else:
            order = list(q)
            asked: list[Waiter] = []
            history: list[tuple[Waiter, dict[str, int]]] = []

            def place(w: Waiter, asked: list[Waiter] = asked,
                      history: list[tuple[Waiter, dict[str, int]]] = history) -> str | None:
                asked.append(w)
                replica = _can_place(w, free, pool)
                if replica is not None:
                    history.append((w, dict(free)))
                    if not w.internal:
                        free[replica] -= 1
                return replica

            placed = q.admit(place)
            # each waiter asked once, in FIFO order; place()'s answer is what admit reports
            assert asked == order
            assert [w for w, _ in placed] == [w for w, _ in history]
            assert all(r == _can_place(w, before_free, pool) for (w, r), (_, before_free)
                       in zip(placed, history, strict=True))
            left = [w for w in order if all(w is not p for p, _ in placed)]
            assert list(q) == left  # the others keep their order
            assert q.positions() == {w.ticket: i for i, w in enumerate(left)}
            # FIFO among equals: when a waiter was placed, no earlier waiter that stays
            # queued could have been placed with the slots free at that moment
            index = {id(w): i for i, w in enumerate(order)}
            for w, before_free in history:
                for earlier in left:
                    if index[id(earlier)] < index[id(w)]:
                        assert _can_place(earlier, before_free, pool) is None, (earlier, w)
    # tickets stay in FIFO order throughout
    tickets = [w.ticket for w in q]
    assert tickets == sorted(tickets)


@settings(max_examples=200, deadline=None)
@given(
    arrivals=st.lists(st.floats(0, 100, allow_nan=False), max_size=12),
    timeout=st.floats(0.5, 50, allow_nan=False),
    now=st.floats(0, 200, allow_nan=False),
)
def test_expire_takes_exactly_the_waiters_past_their_deadline(
    arrivals: list[float], timeout: float, now: float
) -> None:
    q = AdmissionQueue(max_queue=100, timeout=timeout)
    ws = []
    for i, t in enumerate(sorted(arrivals)):
        w = waiter(f"w{i}")
        assert q.offer(w, t)
        ws.append(w)
    expected_deadline = min((w.deadline for w in ws), default=None)
    assert q.next_deadline() == expected_deadline
    gone = q.expire(now)
    assert gone == [w for w in ws if w.enqueued + timeout <= now]
    assert list(q) == [w for w in ws if w.enqueued + timeout > now]
    assert all(w.deadline > now for w in q)



def _tenant_waiter(tenant: str, ref: str) -> Waiter:
    return Waiter(ref, False, None, None, 0.0, 0.0, tenant=tenant)


def test_a_tenant_with_one_build_is_served_second_not_after_a_burst() -> None:
    queue = AdmissionQueue(max_queue=1000, timeout=60)
    for i in range(50):
        assert queue.offer(_tenant_waiter("a", f"a{i}"), 0.0)
    assert queue.offer(_tenant_waiter("b", "b0"), 1.0)
    order = [w.ref for w in queue]
    assert order[:3] == ["a0", "b0", "a1"]
    placed = queue.admit(lambda w: "r")  # everyone, in the fair order
    assert [w.ref for w, _r in placed] == order


def test_fair_order_holds_as_builds_are_admitted_and_new_ones_come() -> None:
    """After 10 of A's 30 builds ran, B's two new builds are not put behind A's other 20."""
    queue = AdmissionQueue(max_queue=1000, timeout=60)
    for i in range(30):
        queue.offer(_tenant_waiter("a", f"a{i}"), 0.0)
    budget = iter(range(10))
    queue.admit(lambda w: "r" if next(budget, None) is not None else None)
    queue.offer(_tenant_waiter("b", "b0"), 1.0)
    queue.offer(_tenant_waiter("b", "b1"), 1.0)
    order = [w.ref for w in queue]
    assert order.index("b0") <= 1 and order.index("b1") <= 3, order
    assert [r for r in order if r.startswith("a")] == [f"a{i}" for i in range(10, 30)]


def test_a_tenant_is_held_to_its_share_of_the_queue() -> None:
    queue = AdmissionQueue(max_queue=1000, timeout=60, max_per_tenant=2)
    assert queue.offer(_tenant_waiter("a", "a0"), 0.0)
    assert queue.offer(_tenant_waiter("a", "a1"), 0.0)
    assert not queue.offer(_tenant_waiter("a", "a2"), 0.0)
    assert queue.offer(_tenant_waiter("b", "b0"), 0.0)
    assert queue.queued_by("a") == 2
    queue.remove(next(w.ticket for w in queue if w.ref == "a0"))
    assert queue.offer(_tenant_waiter("a", "a2"), 0.0)  # room again
    assert [w for w in queue.expire(1000.0)] and queue.queued_by("a") == 0
