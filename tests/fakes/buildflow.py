"""BuildKit client call patterns (buildkit-wire.md section 3) over any `Transport`.

Design
------
* `build` is `client.Build` as buildctl and buildx use it: ListWorkers first (sequential), then
  four concurrent activities started in an order shuffled by `rng`: the Session tunnel, the
  unary Solve, the Status stream and the LLBBridge callback (Ping -> [Solve] -> Return, carrying
  header `buildkit-controlapi-buildid`). Like the real client's errgroup, the first failure
  cancels everything else; every wait is bounded by `timeout`, so nothing is left hanging.
* Failures are captured in the returned outcome (never raised), formatted like the Go client:
  "<Code>: <message>" ("<message>" alone for Unknown), prefixed by "failed to solve: " or
  "failed to receive status: " as buildctl does.
* The session uploads `upload` bytes as ~10 KB `BytesMessage`s, then `b'upload-done'`; once
  Solve has returned it half-closes and drains to EOF. Status is read to its end; if it is
  still open `status_grace` seconds after Solve returned it is cancelled quietly, as the
  real client does after 5 s of silence.
* Random IDs come from `ids.new_id()` (never from `rng`, so seeded flows cannot reuse a Ref);
  `rng` only orders the concurrent calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field

from gateway.pb import control_pb2 as cpb
from gateway.pb import gateway_pb2 as gpb

from .ids import new_id
from .transport import BidiCall, RpcError, Transport

CONTROL = "/moby.buildkit.v1.Control/"
LLB = "/moby.buildkit.v1.frontend.LLBBridge/"
LIST_WORKERS = CONTROL + "ListWorkers"
SESSION = CONTROL + "Session"
SOLVE = CONTROL + "Solve"
STATUS = CONTROL + "Status"
HISTORY = CONTROL + "ListenBuildHistory"
LLB_PING = LLB + "Ping"
LLB_SOLVE = LLB + "Solve"
LLB_RETURN = LLB + "Return"

SESSION_UUID = "x-docker-expose-session-uuid"
SESSION_SHAREDKEY = "x-docker-expose-session-sharedkey"
SESSION_METHOD = "x-docker-expose-session-grpc-method"
BUILD_ID = "buildkit-controlapi-buildid"
SESSION_METHODS = ("/moby.filesync.v1.FileSync/DiffCopy", "/moby.filesync.v1.FileSync/TarStream")
UPLOAD_DONE = b"upload-done"
CHUNK = 10_000
HISTORY_PROBE_REF = "buildx-test-history-api-feature"

_GO_CODES = [
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
]


def format_error(e: BaseException) -> str:
    """Go-client style: '<Code>: <message>', or the message alone for Unknown."""
    if isinstance(e, RpcError):
        if e.code == 2:
            return e.details
        name = _GO_CODES[e.code] if 0 <= e.code < len(_GO_CODES) else f"Code({e.code})"
        return f"{name}: {e.details}"
    return f"{type(e).__name__}: {e}"


@dataclass
class BuildOutcome:
    ref: str
    session: str
    ok: bool
    error: str | None
    exporter_response: dict[str, str] = field(default_factory=dict)
    status: list[cpb.StatusResponse] = field(default_factory=list)
    replica: str = ""  # ExporterResponse['replica']
    error_code: int | None = None  # gRPC code of the first failure, if it was an RPC error
    calls: dict[str, str] = field(default_factory=dict)  # activity -> 'ok' | error | 'cancelled'
    session_messages: list[bytes] = field(default_factory=list)  # tunnel frames from server


@dataclass
class BuildxOutcome:
    """`docker buildx build`: boot, capability probe, build(s), history-API probe."""

    probe: BuildOutcome | None
    builds: list[BuildOutcome]
    error: str | None = None  # boot or history-probe failure
    history_events: int = 0

    @property
    def ok(self) -> bool:
        return (self.error is None and self.probe is not None and self.probe.ok
                and all(b.ok for b in self.builds))


@dataclass
class BakeOutcome:
    """`docker buildx bake`: one shared context session, targets built concurrently."""

    shared_session: str
    builds: list[BuildOutcome]
    error: str | None = None  # shared-session failure
    session_messages: list[bytes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and all(b.ok for b in self.builds)


def sharedkey_for(context_dir: str | None, node_id: str) -> str:
    """buildx: basename of the absolute context dir + ':' + node id ('' without a dir)."""
    if context_dir is None:
        return ""
    return f"{os.path.basename(os.path.abspath(context_dir))}:{node_id}"


def session_metadata(session_id: str, sharedkey: str) -> list[tuple[str, str]]:
    md = [(SESSION_UUID, session_id), (SESSION_SHAREDKEY, sharedkey)]
    md.extend((SESSION_METHOD, m) for m in SESSION_METHODS)
    return md


def upload_payload(n: int) -> bytes:
    """Deterministic upload content of n bytes."""
    block = bytes(range(256))
    return (block * (n // 256 + 1))[:n]


async def _upload(call: BidiCall, n: int) -> None:
    data = upload_payload(n)
    for off in range(0, n, CHUNK):
        await call.send(cpb.BytesMessage(data=data[off:off + CHUNK]).SerializeToString())
    await call.send(cpb.BytesMessage(data=UPLOAD_DONE).SerializeToString())


async def _drain(call: BidiCall, into: list[bytes]) -> None:
    while (raw := await call.recv()) is not None:
        into.append(cpb.BytesMessage.FromString(raw).data)


async def _run_session(t: Transport, session_id: str, sharedkey: str, upload: int,
                       release: asyncio.Event, into: list[bytes]) -> None:
    """Open a session, upload, hold it until `release`, then half-close and drain to EOF."""
    call = await t.bidi(SESSION, session_metadata(session_id, sharedkey))
    reader = asyncio.create_task(_drain(call, into))
    try:
        await _upload(call, upload)
        released = asyncio.create_task(release.wait())
        try:
            await asyncio.wait({reader, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
        if not reader.done():
            await call.done_writing()
        await reader  # EOF (or the server's error)
    finally:
        reader.cancel()
        call.cancel()  # no-op once the call has ended


async def _cancel_all(tasks: set[asyncio.Task[None]], grace: float = 5.0) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=grace)


async def build(t: Transport, *, context_dir: str | None, node_id: str, internal: bool = False,
                ref: str | None = None, upload: int = 0,
                shared_sessions: Mapping[str, str] = {},
                rng: random.Random | None = None, list_workers: bool = True,
                sharedkey: str | None = None, llb_solve: bool = True,
                frontend_attrs: Mapping[str, str] = {},
                session_id: str | None = None, timeout: float = 30.0,
                status_grace: float = 5.0) -> BuildOutcome:
    """One `client.Build` (see module docstring). `shared_sessions` maps a local name to the
    id of an already open session (sent as FrontendAttrs `local-sessionid:<name>`);
    `sharedkey` overrides the buildx-derived key; `llb_solve=False` is the probe callback."""
    rng = rng or random.Random()
    ref = ref or new_id()
    sid = session_id or new_id()
    out = BuildOutcome(ref=ref, session=sid, ok=False, error=None)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if sharedkey is None:
        sharedkey = "" if internal else sharedkey_for(context_dir, node_id)

    if list_workers:
        try:
            await t.unary(LIST_WORKERS, cpb.ListWorkersRequest().SerializeToString(),
                          timeout=timeout)
            out.calls["list_workers"] = "ok"
        except RpcError as e:
            out.error = "listing workers for Build: failed to list workers: " + format_error(e)
            out.error_code = e.code
            out.calls["list_workers"] = out.error
            return out

    attrs = dict(frontend_attrs)
    attrs.update({f"local-sessionid:{name}": s for name, s in shared_sessions.items()})
    solve_req = cpb.SolveRequest(Ref=ref, Session=sid, FrontendAttrs=attrs, Internal=internal)
    solve_done = asyncio.Event()
    bridge_md = [(BUILD_ID, ref)]

    async def run_session() -> None:
        await _run_session(t, sid, sharedkey, upload, solve_done, out.session_messages)

    async def run_solve() -> None:
        try:
            resp = await t.unary(SOLVE, solve_req.SerializeToString())
            out.exporter_response = dict(cpb.SolveResponse.FromString(resp).ExporterResponse)
        finally:
            solve_done.set()

    async def run_status() -> None:
        stream = t.server_stream(STATUS, cpb.StatusRequest(Ref=ref).SerializeToString())
        try:
            async for raw in stream:
                out.status.append(cpb.StatusResponse.FromString(raw))
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def run_llb() -> None:
        await t.unary(LLB_PING, gpb.PingRequest().SerializeToString(), bridge_md, timeout=15)
        result = gpb.Result()
        if llb_solve:
            resp = await t.unary(LLB_SOLVE, gpb.SolveRequest(Frontend="dockerfile.v0")
                                 .SerializeToString(), bridge_md)
            result = gpb.SolveResponse.FromString(resp).result
        await t.unary(LLB_RETURN, gpb.ReturnRequest(result=result).SerializeToString(), bridge_md)

    activities: list[tuple[str, Callable[[], Coroutine[None, None, None]]]] = [
        ("session", run_session), ("solve", run_solve), ("status", run_status), ("llb", run_llb)]
    rng.shuffle(activities)
    tasks: dict[asyncio.Task[None], str] = {
        asyncio.create_task(fn(), name=f"build-{ref}-{name}"): name for name, fn in activities}
    pending = set(tasks)
    try:
        await _supervise(tasks, pending, out, deadline=deadline, status_grace=status_grace,
                         timeout=timeout)
    except asyncio.CancelledError:  # the caller gave up on the build: so do its calls
        await _cancel_all(set(tasks))
        raise
    out.replica = out.exporter_response.get("replica", "")
    out.ok = out.error is None and out.calls.get("solve") == "ok"
    return out


_PREFIXES = {"solve": "failed to solve: ", "status": "failed to receive status: ",
             "session": "session: ", "llb": ""}


async def _supervise(tasks: dict[asyncio.Task[None], str], pending: set[asyncio.Task[None]],
                     out: BuildOutcome, *, deadline: float, status_grace: float,
                     timeout: float) -> None:
    """Waits for a build's concurrent calls; the first failure ends the build."""
    loop = asyncio.get_running_loop()
    prefixes = _PREFIXES
    status_deadline: float | None = None
    while pending and out.error is None:
        wake = deadline if status_deadline is None else min(deadline, status_deadline)
        done, pending = await asyncio.wait(pending, timeout=max(0.0, wake - loop.time()),
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            name = tasks[task]
            exc: BaseException | None = (
                asyncio.CancelledError("cancelled") if task.cancelled() else task.exception())
            if exc is None:
                out.calls[name] = "ok"
                if name == "solve":
                    status_deadline = loop.time() + status_grace
            else:
                out.calls[name] = format_error(exc)
                if out.error is None:
                    out.error = prefixes[name] + format_error(exc)
                    out.error_code = exc.code if isinstance(exc, RpcError) else None
        if done:
            continue
        now = loop.time()
        if status_deadline is not None and now >= status_deadline and pending:
            status = {tk for tk in pending if tasks[tk] == "status"}
            await _cancel_all(status)
            if status:
                out.calls["status"] = "cancelled"
            pending -= status
            status_deadline = None
        elif now >= deadline:
            out.error = f"timeout after {timeout}s waiting for {sorted(tasks[x] for x in pending)}"
    for task in pending:
        out.calls[tasks[task]] = "cancelled"
    await _cancel_all(pending)


async def probe(t: Transport, *, rng: random.Random | None = None,
                timeout: float = 30.0) -> BuildOutcome:
    """buildx's capability probe: Internal build, empty sharedkey, no upload, Ping + Return."""
    return await build(t, context_dir=None, node_id="", internal=True, upload=0, rng=rng,
                       llb_solve=False, timeout=timeout)


async def history_probe(t: Transport, ref: str = HISTORY_PROBE_REF) -> int:
    """ListenBuildHistory{ActiveOnly, Ref, EarlyExit} read to EOF; returns the event count."""
    req = cpb.BuildHistoryRequest(ActiveOnly=True, Ref=ref, EarlyExit=True)
    n = 0
    stream = t.server_stream(HISTORY, req.SerializeToString())
    try:
        async for _ in stream:
            n += 1
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    return n


async def buildx_session(t: Transport, *, context_dir: str | None, node_id: str,
                         builds: int = 1, upload: int = 0, rng: random.Random | None = None,
                         timeout: float = 30.0) -> BuildxOutcome:
    """One buildx process on one connection: ListWorkers (boot), probe, `builds` sequential
    builds, then the once-per-process history-API probe."""
    out = BuildxOutcome(probe=None, builds=[])
    try:
        await t.unary(LIST_WORKERS, cpb.ListWorkersRequest().SerializeToString(),
                      timeout=timeout)
    except RpcError as e:
        out.error = "boot: " + format_error(e)
        return out
    out.probe = await probe(t, rng=rng, timeout=timeout)
    if not out.probe.ok:
        return out
    for _ in range(builds):
        b = await build(t, context_dir=context_dir, node_id=node_id, upload=upload, rng=rng,
                        timeout=timeout)
        out.builds.append(b)
        if not b.ok:
            return out
    try:
        async with asyncio.timeout(timeout):
            out.history_events = await history_probe(t)
    except (RpcError, TimeoutError) as e:
        out.error = "history probe: " + format_error(e)
    return out


async def bake(t: Transport, *, context_dir: str, node_id: str, targets: int, upload: int = 0,
               rng: random.Random | None = None,
               timeout: float = 30.0) -> BakeOutcome:
    """Shared context session first (uploaded once), then `targets` concurrent builds that
    name it as `local-sessionid:context`; the shared session closes after all finish."""
    rng = rng or random.Random()
    shared = new_id()
    out = BakeOutcome(shared_session=shared, builds=[])
    release = asyncio.Event()
    session_task = asyncio.create_task(_run_session(
        t, shared, sharedkey_for(context_dir, node_id), upload, release, out.session_messages))
    try:
        out.builds = list(await asyncio.gather(*(
            build(t, context_dir=context_dir, node_id=node_id, upload=0,
                  shared_sessions={"context": shared}, rng=random.Random(rng.random()),
                  timeout=timeout)
            for _ in range(targets))))
        release.set()
        done, _ = await asyncio.wait({session_task}, timeout=timeout)
        if not done:
            out.error = "shared session: did not end after half-close"
        elif (exc := session_task.exception()) is not None:
            out.error = "shared session: " + format_error(exc)
    finally:
        session_task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait({session_task}, timeout=5)
    return out


async def buildctl(t: Transport, *, context_dir: str | None, upload: int = 0,
                   ref: str | None = None, rng: random.Random | None = None,
                   timeout: float = 30.0) -> BuildOutcome:
    """`buildctl build --local context=...`: ListWorkers, then one build, empty sharedkey."""
    return await build(t, context_dir=context_dir, node_id="", sharedkey="", upload=upload,
                       ref=ref, rng=rng, timeout=timeout)
