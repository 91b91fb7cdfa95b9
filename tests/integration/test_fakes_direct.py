"""The test doubles themselves: BuildKit flows against FakeReplica, its failure modes, and the
proof (through a per-call round-robin proxy) that misrouted builds fail like real buildkitd.

Every wait is bounded: events/conditions with timeouts, never sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.pb import control_pb2 as cpb
from tests.fakes import buildflow
from tests.fakes.grpc_transport import GrpcCall, GrpcTransport
from tests.fakes.ids import new_id, node_id
from tests.fakes.naive_router import NaiveRouter
from tests.fakes.replica import (
    ECHO_ERROR_DEFAULT,
    SESSION_END,
    FakeReplica,
    JoinLimits,
    error_details,
)
from tests.fakes.transport import RpcError

pytestmark = pytest.mark.timeout(30)

C = "/moby.buildkit.v1.Control/"
LLB = "/moby.buildkit.v1.frontend.LLBBridge/"
SHORT = JoinLimits(llb=0.3, session=0.5, status=0.6)

MakeReplica = Callable[..., Awaitable[FakeReplica]]
Connect = Callable[..., GrpcTransport]


@pytest.fixture
async def make_replica() -> AsyncIterator[MakeReplica]:
    made: list[FakeReplica] = []

    async def make(name: str, **kw: object) -> FakeReplica:
        r = FakeReplica(name, **kw)  # type: ignore[arg-type]
        await r.start()
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop(None)


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    made: list[GrpcTransport] = []

    def make(target: str, **kw: object) -> GrpcTransport:
        t = GrpcTransport(target, **kw)  # type: ignore[arg-type]
        made.append(t)
        return t

    yield make
    for t in made:
        await t.close()


@pytest.fixture
async def make_router() -> AsyncIterator[Callable[[list[FakeReplica]], Awaitable[NaiveRouter]]]:
    made: list[NaiveRouter] = []

    async def make(replicas: list[FakeReplica]) -> NaiveRouter:
        router = NaiveRouter([r.address for r in replicas])
        await router.start()
        made.append(router)
        return router

    yield make
    for router in made:
        await router.stop(None)


def by_ref(replica: FakeReplica, ref: str) -> dict[str, str]:
    """method path -> outcome for the finished calls of one build."""
    return {r.method: r.outcome for r in replica.records if r.ref == ref}


BUILD_CALLS = {C + "Solve", C + "Status", LLB + "Ping", LLB + "Solve", LLB + "Return"}


# ---------------------------------------------------------------------------- ids

def test_ids_shape() -> None:
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[0-9a-z]{25}", i) for i in ids)
    assert new_id(random.Random(7)) == new_id(random.Random(7))
    assert re.fullmatch(r"[0-9a-f]{16}", node_id())


# ---------------------------------------------------------------------------- (a) flows

async def test_buildctl_direct(make_replica: MakeReplica, connect: Connect,
                               tmp_path: Path) -> None:
    r = await make_replica("r0")
    t = connect(r.address)
    out = await buildflow.buildctl(t, context_dir=str(tmp_path / "app"), upload=25_000,
                                   rng=random.Random(1))
    assert out.ok, out
    assert out.exporter_response == {"replica": "r0", "uploaded": "25000"}
    assert out.replica == "r0"
    assert out.session_messages == [b"ack 25000", SESSION_END]

    # Status: a started vertex, then the same digest completed.
    digest = "sha256:" + hashlib.sha256((out.ref + "r0").encode()).hexdigest()
    assert [len(s.vertexes) for s in out.status] == [1, 1]
    first, last = out.status[0].vertexes[0], out.status[1].vertexes[0]
    assert first.digest == last.digest == digest and first.name == "[r0] build"
    assert first.HasField("started") and not first.HasField("completed")
    assert last.HasField("completed") and not last.error

    assert by_ref(r, out.ref) == dict.fromkeys(BUILD_CALLS, "ok")
    (sess,) = r.calls(C + "Session")
    assert (sess.session, sess.sharedkey, sess.outcome) == (out.session, "", "ok")
    methods = [v for k, v in sess.metadata if k == "x-docker-expose-session-grpc-method"]
    assert methods == list(buildflow.SESSION_METHODS)  # separate values, in order
    assert r.sessions[out.session].methods == buildflow.SESSION_METHODS
    assert [x.method for x in r.records].count(C + "ListWorkers") == 1
    assert r.refs_seen() == {out.ref} and r.sessions_seen() == {out.session}
    assert len({x.peer for x in r.records}) == 1  # one channel = one HTTP/2 connection
    assert r.active_builds() == [] and r.active_sessions() == []
    assert out.ref in r.history


async def test_buildx_session_direct(make_replica: MakeReplica, connect: Connect,
                                     tmp_path: Path) -> None:
    r = await make_replica("r0")
    node = node_id()
    out = await buildflow.buildx_session(connect(r.address), context_dir=str(tmp_path / "proj"),
                                         node_id=node, builds=2, upload=12_345)
    assert out.ok, out
    assert out.probe is not None and out.history_events == 0
    probe_ref = out.probe.ref
    # The probe: internal, empty sharedkey, Ping + Return only, not kept in history.
    assert by_ref(r, probe_ref) == {C + "Solve": "ok", C + "Status": "ok",
                                    LLB + "Ping": "ok", LLB + "Return": "ok"}
    assert all(x.internal for x in r.records if x.ref == probe_ref)
    assert r.sessions[out.probe.session].sharedkey == ""
    assert probe_ref not in r.history
    for b in out.builds:
        assert b.exporter_response == {"replica": "r0", "uploaded": "12345"}
        assert by_ref(r, b.ref) == dict.fromkeys(BUILD_CALLS, "ok")
        assert r.sessions[b.session].sharedkey == f"proj:{node}"
        assert b.ref in r.history
    # boot + one per client.Build (probe and two builds)
    assert len(r.calls(C + "ListWorkers")) == 4
    (hist,) = r.calls(C + "ListenBuildHistory")
    assert hist.ref == buildflow.HISTORY_PROBE_REF and hist.outcome == "ok"
    assert len({x.peer for x in r.records}) == 1


async def test_bake_direct(make_replica: MakeReplica, connect: Connect, tmp_path: Path) -> None:
    r = await make_replica("r0")
    node = node_id()
    out = await buildflow.bake(connect(r.address), context_dir=str(tmp_path / "mono"),
                               node_id=node, targets=3, upload=30_000)
    assert out.ok, out
    assert out.session_messages == [b"ack 30000", SESSION_END]
    assert len(out.builds) == 3 and len({b.ref for b in out.builds}) == 3
    for b in out.builds:
        assert b.exporter_response == {"replica": "r0", "uploaded": "0",
                                       "shared_uploaded": "30000"}
        assert r.history[b.ref].frontend_attrs == {"local-sessionid:context": out.shared_session}
        assert by_ref(r, b.ref) == dict.fromkeys(BUILD_CALLS, "ok")
    shared = r.sessions[out.shared_session]
    assert shared.sharedkey == f"mono:{node}" and shared.bytes == 30_000 and not shared.active
    assert len(r.calls(C + "Session")) == 4  # shared + one per target
    assert r.sessions_seen() == {out.shared_session, *(b.session for b in out.builds)}


# ---------------------------------------------------------------------------- (b) same Ref

async def _open_uploaded_session(t: GrpcTransport, sid: str) -> GrpcCall:
    call = await t.bidi(C + "Session", buildflow.session_metadata(sid, ""))
    await call.send(cpb.BytesMessage(data=b"x" * 10).SerializeToString())
    await call.send(cpb.BytesMessage(data=b"upload-done").SerializeToString())
    assert await call.recv() == cpb.BytesMessage(data=b"ack 10").SerializeToString()
    return call


async def _close_session(call: GrpcCall) -> None:
    """Half-close; the replica answers with its final frame, then ends the stream OK."""
    await call.done_writing()
    assert await call.recv() == cpb.BytesMessage(data=SESSION_END).SerializeToString()
    assert await call.recv() is None
    assert await call.code() == 0


async def test_duplicate_ref_and_cancelled_solve(make_replica: MakeReplica,
                                                 connect: Connect) -> None:
    r = await make_replica("r0")
    t = connect(r.address)
    ref, sid = new_id(), new_id()
    session = await _open_uploaded_session(t, sid)
    req = cpb.SolveRequest(Ref=ref, Session=sid).SerializeToString()
    first = asyncio.create_task(t.unary(C + "Solve", req))  # waits for LLBBridge/Return
    await r.wait_for(lambda: ref in r.active_builds(), timeout=5)
    status = t.open_server_stream(C + "Status", cpb.StatusRequest(Ref=ref).SerializeToString())
    assert (await status.recv()) is not None  # started vertex

    with pytest.raises(RpcError) as err:
        await t.unary(C + "Solve", req)
    assert err.value.code == 2 and err.value.details == f"job ID {ref} exists"
    assert ref in r.active_builds()  # the running build is unaffected

    first.cancel()
    rec = await r.wait_cancelled(C + "Solve", timeout=5)
    assert rec.ref == ref
    assert r.active_builds() == []
    closing = cpb.StatusResponse.FromString(await status.recv())
    assert closing.vertexes[0].error == "context canceled"
    assert await status.recv() is None
    session.cancel()
    await r.wait_cancelled(C + "Session", timeout=5)
    assert [x.outcome for x in r.calls(C + "Solve")] == ["UNKNOWN", "cancelled"]


# ---------------------------------------------------------------------------- (c) join limits

async def test_join_limits_fail_like_buildkitd(make_replica: MakeReplica,
                                               connect: Connect) -> None:
    a = await make_replica("a", limits=SHORT)
    b = await make_replica("b", limits=SHORT)
    ta, tb = connect(a.address), connect(b.address)
    ref = new_id()
    loop = asyncio.get_running_loop()

    async def status_error() -> tuple[RpcError, float, list[tuple[str, str | bytes]]]:
        start = loop.time()
        call = ta.open_server_stream(C + "Status", cpb.StatusRequest(Ref=ref).SerializeToString())
        headers = await call.headers()
        with pytest.raises(RpcError) as err:
            await call.recv()
        return err.value, loop.time() - start, headers

    async def ping_error(md: list[tuple[str, str]]) -> tuple[RpcError, float]:
        start = loop.time()
        with pytest.raises(RpcError) as err:
            await ta.unary(LLB + "Ping", b"", md)
        return err.value, loop.time() - start

    (st, st_t, headers), (ping, ping_t), (none, _), (two, _) = await asyncio.gather(
        status_error(), ping_error([("buildkit-controlapi-buildid", ref)]), ping_error([]),
        ping_error([("buildkit-controlapi-buildid", ref), ("buildkit-controlapi-buildid", ref)]))
    assert (st.code, st.details) == (5, f"no such job {ref}")
    assert st_t >= SHORT.status * 0.9
    ts = dict(headers)["buildkit-current-timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", str(ts))
    assert (ping.code, ping.details) == (5, f"forwarding Ping: no such job {ref}")
    assert ping_t >= SHORT.llb * 0.9
    assert (none.code, none.details) == (2, "forwarding Ping: no buildid found in context")
    assert (two.code, two.details) == (2, "forwarding Ping: no buildid found in context")

    # The session lives on b, the Solve lands on a.
    sid = new_id()
    session = await _open_uploaded_session(tb, sid)
    start = loop.time()
    with pytest.raises(RpcError) as err:
        await ta.unary(C + "Solve", cpb.SolveRequest(Ref=new_id(), Session=sid)
                       .SerializeToString())
    assert err.value.code == 4
    assert err.value.details == f"no active session for {sid}: context deadline exceeded"
    assert loop.time() - start >= SHORT.session * 0.9
    assert a.active_builds() == []
    # A shared session named in FrontendAttrs must be on the same replica too.
    own = new_id()
    own_session = await _open_uploaded_session(ta, own)
    with pytest.raises(RpcError) as err:
        await ta.unary(C + "Solve", cpb.SolveRequest(
            Ref=new_id(), Session=own, FrontendAttrs={"local-sessionid:context": sid})
            .SerializeToString())
    assert err.value.details == f"no active session for {sid}: context deadline exceeded"
    for call in (session, own_session):
        await _close_session(call)
    assert [x.outcome for x in a.calls(C + "Session")] == ["ok"]


# ---------------------------------------------------------------------------- (d) the proof

async def test_naive_router_breaks_builds(make_replica: MakeReplica, connect: Connect,
                                          make_router: Callable[..., Awaitable[NaiveRouter]],
                                          tmp_path: Path) -> None:
    replicas = [await make_replica(f"r{i}", limits=SHORT) for i in range(3)]
    router = await make_router(replicas)
    ctx = str(tmp_path / "svc")
    node = node_id()
    started = time.monotonic()
    results = await asyncio.gather(
        *(buildflow.buildctl(connect(router.address), context_dir=ctx, rng=random.Random(i))
          for i in range(3)),
        buildflow.buildx_session(connect(router.address), context_dir=ctx, node_id=node),
        buildflow.bake(connect(router.address), context_dir=ctx, node_id=node, targets=2))
    elapsed = time.monotonic() - started
    errors: list[str] = []
    for res in results:
        assert not res.ok, res
        if isinstance(res, buildflow.BuildOutcome):
            errors.append(res.error or "")
        elif isinstance(res, buildflow.BuildxOutcome):
            assert res.probe is not None
            errors.append(res.probe.error or "")
        else:
            errors.extend(b.error or "" for b in res.builds)
    assert errors and all("no active session for" in e or "no such job" in e for e in errors), \
        errors
    outcomes = {x.outcome for r in replicas for x in r.records}
    assert outcomes & {"NOT_FOUND", "DEADLINE_EXCEEDED"}
    assert len({backend for _, backend in router.routed}) == 3
    assert elapsed < 10
    # Nothing is left running anywhere once the flows returned.
    for r in replicas:
        await r.wait_for(lambda r=r: not r.active_builds() and not r.active_sessions(),
                         timeout=5)


async def test_naive_router_single_backend_is_transparent(
        make_replica: MakeReplica, connect: Connect,
        make_router: Callable[..., Awaitable[NaiveRouter]], tmp_path: Path) -> None:
    r = await make_replica("only")
    router = await make_router([r])
    t = connect(router.address)
    ctx = str(tmp_path / "svc")
    node = node_id()
    one = await buildflow.buildctl(t, context_dir=ctx, upload=50_000)
    session = await buildflow.buildx_session(t, context_dir=ctx, node_id=node)
    baked = await buildflow.bake(t, context_dir=ctx, node_id=node, targets=2, upload=20_000)
    assert one.ok and session.ok and baked.ok, (one, session, baked)
    assert one.exporter_response == {"replica": "only", "uploaded": "50000"}
    (sess,) = [x for x in r.calls(C + "Session") if x.session == one.session]
    methods = [v for k, v in sess.metadata if k == "x-docker-expose-session-grpc-method"]
    assert methods == list(buildflow.SESSION_METHODS)


# ---------------------------------------------------------------------------- (e) Echo

ECHO_MD = [("x-echo-a", "1"), ("x-other", "no"), ("x-echo-a", "2"),
           ("x-echo-b-bin", b"\x00\xff\x10"), ("x-echo-c", "three")]
ECHOED = [(k, v) for k, v in ECHO_MD if k.startswith("x-echo-")]


def grouped(md: object) -> dict[str, list[object]]:
    """Application metadata as key -> values in order (what gRPC guarantees to keep)."""
    out: dict[str, list[object]] = {}
    for k, v in md:  # type: ignore[attr-defined]
        if k.startswith("x-"):
            out.setdefault(k, []).append(v)
    return out


@pytest.fixture(params=["direct", "router"])
async def echo_target(request: pytest.FixtureRequest, make_replica: MakeReplica,
                      connect: Connect, make_router: Callable[..., Awaitable[NaiveRouter]]
                      ) -> tuple[FakeReplica, GrpcTransport]:
    r = await make_replica("echo")
    if request.param == "direct":
        return r, connect(r.address)
    router = await make_router([r])
    return r, connect(router.address)


async def test_echo_unary_and_streams(echo_target: tuple[FakeReplica, GrpcTransport]) -> None:
    r, t = echo_target
    payload = bytes(range(256)) * 4096 + b"\x00"  # 1 MiB + 1, all byte values
    res = await t.unary_full("/test.Echo/Unary", payload, ECHO_MD)
    assert res.response == payload and res.trailers == ECHOED
    (rec,) = r.calls("/test.Echo/Unary")
    # grpcio's client groups metadata by key (order across keys is lost, per-key order kept).
    assert grouped(rec.metadata) == grouped(ECHO_MD)

    big = bytes((i * 7) & 0xFF for i in range(15 << 20))  # under the 16 MiB limit
    assert (await t.unary_full("/test.Echo/Unary", big)).response == big

    stream = t.open_server_stream("/test.Echo/ServerStream", b"abc\x00", ECHO_MD)
    got = []
    while (m := await stream.recv()) is not None:
        got.append(m)
    assert got == [b"abc\x00"] * 3 and await stream.trailers() == ECHOED
    assert [m async for m in t.server_stream("/test.Echo/ServerStream", b"")] == [b""] * 3

    cs = await t.bidi("/test.Echo/ClientStream", ECHO_MD)
    for part in (b"one-", b"", b"two-", b"\xff" * 70_000):
        await cs.send(part)
    await cs.done_writing()
    assert await cs.recv() == b"one-two-" + b"\xff" * 70_000
    assert await cs.recv() is None and await cs.trailers() == ECHOED

    bidi = await t.bidi("/test.Echo/Bidi", ECHO_MD)
    for i in range(5):
        msg = bytes([i]) * (i * 1000)
        await bidi.send(msg)
        assert await bidi.recv() == msg
    await bidi.done_writing()  # half-close: the server finishes OK
    assert await bidi.recv() is None
    assert await bidi.trailers() == ECHOED and await bidi.code() == 0
    assert {x.outcome for x in r.records} == {"ok"}


async def test_echo_error_trailer_and_hang(echo_target: tuple[FakeReplica, GrpcTransport]
                                           ) -> None:
    r, t = echo_target
    with pytest.raises(RpcError) as err:
        await t.unary("/test.Echo/Error", b"", ECHO_MD)
    assert (err.value.code, err.value.details) == (9, "deliberate failure")
    trailers = err.value.trailers
    assert trailers[0] == ("grpc-status-details-bin", error_details(ECHO_ERROR_DEFAULT))
    assert len(trailers[0][1]) == 40 * 1024
    assert trailers[1:] == [(k, v if isinstance(v, bytes) else v.encode()) for k, v in ECHOED]
    for n in (0, 1, 5, 100, 300, 70_000):
        with pytest.raises(RpcError) as err:
            await t.unary("/test.Echo/Error", n.to_bytes(4, "big"))
        details = dict(err.value.trailers).get("grpc-status-details-bin", b"")
        assert details == error_details(n) and len(details) == n
    assert [x.outcome for x in r.calls("/test.Echo/Error")] == ["FAILED_PRECONDITION"] * 7

    hang = asyncio.create_task(t.unary("/test.Echo/Hang", b"zzz"))
    await r.wait_for(lambda: r.inflight()["/test.Echo/Hang"] == 1, timeout=5)
    hang.cancel()
    rec = await r.wait_cancelled("/test.Echo/Hang", timeout=5)
    assert rec.outcome == "cancelled"
    with pytest.raises(asyncio.CancelledError):
        await hang


# ---------------------------------------------------------------------------- global calls

async def test_global_calls_and_history(make_replica: MakeReplica, connect: Connect) -> None:
    r = await make_replica("g")
    t = connect(r.address)
    workers = cpb.ListWorkersResponse.FromString(await t.unary(C + "ListWorkers", b""))
    (w,) = workers.record
    assert (w.ID, dict(w.Labels)) == ("g", {"replica": "g"})
    assert [(p.OS, p.Architecture) for p in w.platforms] == [("linux", "amd64")]
    info = cpb.InfoResponse.FromString(await t.unary(C + "Info", b""))
    assert (info.buildkitVersion.version, info.buildkitVersion.package) == ("v0.fake", "fake/g")
    du = cpb.DiskUsageResponse.FromString(await t.unary(C + "DiskUsage", b""))
    assert [u.ID for u in du.record] == ["g-a", "g-b"]
    pruned = [cpb.UsageRecord.FromString(m) async for m in t.server_stream(C + "Prune", b"")]
    assert [u.ID for u in pruned] == ["g-a", "g-b"]
    assert await t.unary("/grpc.health.v1.Health/Check", b"") == b"\x08\x01"
    for path, msg in ((C + "Nope", "unknown method Nope for service moby.buildkit.v1.Control"),
                      ("/nope.Svc/M", "unknown service nope.Svc")):
        with pytest.raises(RpcError) as err:
            await t.unary(path, b"")
        assert (err.value.code, err.value.details) == (12, msg)
        assert r.calls(path)[0].outcome == "UNIMPLEMENTED"

    async def history(**kw: object) -> list[cpb.BuildHistoryEvent]:
        req = cpb.BuildHistoryRequest(**kw).SerializeToString()  # type: ignore[arg-type]
        return [cpb.BuildHistoryEvent.FromString(m)
                async for m in t.server_stream(C + "ListenBuildHistory", req)]

    # A running build (waiting for Return) and a running internal one.
    sid, isid = new_id(), new_id()
    sessions = [await _open_uploaded_session(t, sid), await _open_uploaded_session(t, isid)]
    ref, iref = new_id(), new_id()
    solves = [asyncio.create_task(t.unary(C + "Solve", cpb.SolveRequest(
        Ref=x, Session=s, Internal=x == iref).SerializeToString()))
        for x, s in ((ref, sid), (iref, isid))]
    await r.wait_for(lambda: set(r.active_builds()) == {ref, iref}, timeout=5)
    active = await history(ActiveOnly=True, EarlyExit=True)
    assert [(e.type, e.record.Ref) for e in active] == [(0, ref)]
    assert await history(Ref=new_id(), EarlyExit=True) == []
    for x in (ref, iref):
        await t.unary(LLB + "Return", b"", [("buildkit-controlapi-buildid", x)])
    for s in solves:
        resp = cpb.SolveResponse.FromString(await s)
        assert resp.ExporterResponse["replica"] == "g"
    done = await history(Ref=ref, EarlyExit=True)
    assert [(e.type, e.record.Ref) for e in done] == [(1, ref)]
    assert done[0].record.HasField("CompletedAt")
    assert await history(ActiveOnly=True, EarlyExit=True) == []
    # Status of a finished build is replayed from history.
    replay = [cpb.StatusResponse.FromString(m) async for m in t.server_stream(
        C + "Status", cpb.StatusRequest(Ref=ref).SerializeToString())]
    assert [v.vertexes[0].HasField("completed") for v in replay] == [False, True]
    for call in sessions:
        await _close_session(call)
