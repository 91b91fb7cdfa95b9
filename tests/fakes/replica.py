"""A fake buildkitd: a plain-h2c grpc.aio server that fails like the real daemon on misrouting.

Design
------
* One `GenericRpcHandler` serves every path with raw-bytes handlers (no (de)serializers); the
  handler decodes with the generated `gateway.pb` classes. Unknown paths are still served (they
  are recorded, then answered UNIMPLEMENTED like grpc-go), so tests see every call that arrived.
* State lives in plain dicts (`sessions`, active jobs, finished jobs). Every change bumps a
  "generation" event; waiters re-check their predicate on each bump. The daemon's join limits
  (LLBBridge->job 3 s, Solve->session 5 s, Status->job 6 s, see buildkit-wire.md section 3a) are
  waits with those timeouts, failing with the daemon's own codes and messages.
* Every call ends in exactly one `CallRecord` (appended when the call ends, with its outcome:
  'ok', a grpc code name, or 'cancelled'). Calls still running are visible through
  `inflight()`, `active_builds()`, `refs_seen()` and `sessions_seen()`.
* `solve_delay` is simulated build time, not synchronisation; a Solve's FrontendAttrs
  `fake-build-seconds` sets its own. `hold`, an event, is the synchronisation: Solves end only
  once it is set.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc

from gateway.pb import control_pb2 as cpb
from gateway.pb import gateway_pb2 as gpb

from .ids import new_id

MAX_MESSAGE = 16 << 20
# grpcio's default receive limit for one header/trailer block is 16 KiB (hard): a 40 KiB
# grpc-status-details-bin trailer is answered RESOURCE_EXHAUSTED unless both ends raise it.
MAX_METADATA = 4 << 20

CONTROL = "/moby.buildkit.v1.Control/"
LLB = "/moby.buildkit.v1.frontend.LLBBridge/"
HEALTH = "/grpc.health.v1.Health/"
ECHO = "/test.Echo/"
CONTENT = "/containerd.services.content.v1.Content/"

SESSION_UUID = "x-docker-expose-session-uuid"
SESSION_SHAREDKEY = "x-docker-expose-session-sharedkey"
SESSION_METHOD = "x-docker-expose-session-grpc-method"
BUILD_ID = "buildkit-controlapi-buildid"
CURRENT_TIMESTAMP = "buildkit-current-timestamp"
UPLOAD_DONE = b"upload-done"
SESSION_END = b"session-end"  # last Session frame, sent after the client's EOF
LOCAL_SESSION_PREFIX = "local-sessionid:"
ECHO_ERROR_DEFAULT = 40 * 1024
DOWNLOAD_CHUNK = 64 * 1024

HISTORY_STARTED, HISTORY_COMPLETE, HISTORY_DELETED = 0, 1, 2

_T = TypeVar("_T")
MetadataPairs = tuple[tuple[str, str | bytes], ...]


BUILD_SECONDS = "fake-build-seconds"  # FrontendAttrs key: this build's simulated time

@dataclass(frozen=True)
class JoinLimits:
    """How long the daemon lets one call wait for another (seconds)."""

    llb: float = 3.0  # LLBBridge/* waiting for the build (forwarder registrar)
    session: float = 5.0  # Solve waiting for each session it uses (session.Manager.Any)
    status: float = 6.0  # Status waiting for the job (solver.Get)

    def scaled(self, factor: float) -> JoinLimits:
        return JoinLimits(self.llb * factor, self.session * factor, self.status * factor)


@dataclass(frozen=True)
class CallRecord:
    """One finished call as the replica saw it."""

    replica: str
    method: str  # full path, e.g. /moby.buildkit.v1.Control/Solve
    ref: str  # build ref ('' if the call has none)
    session: str  # session id ('' if none)
    sharedkey: str
    internal: bool
    peer: str  # context.peer(), e.g. ipv4:127.0.0.1:54321 (one per client connection)
    outcome: str  # 'ok' | grpc code name (e.g. 'NOT_FOUND') | 'cancelled'
    metadata: MetadataPairs  # invocation metadata in arrival order, repeats kept
    started: float = 0.0  # loop.time() at handler start
    ended: float = 0.0  # loop.time() at handler end


@dataclass
class SessionState:
    """A Control/Session tunnel (kept after it closes, with active=False)."""

    id: str
    sharedkey: str
    methods: tuple[str, ...]  # the separate x-docker-expose-session-grpc-method values
    peer: str
    active: bool = True
    bytes: int = 0
    upload_done: bool = False


@dataclass
class Job:
    """A Control/Solve in progress (then kept in history unless internal)."""

    ref: str
    session: str
    internal: bool
    bridge: bool  # LLBBridge forwarder registered (client.Build path, or Internal)
    frontend_attrs: dict[str, str]
    created_ns: int
    returned: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    completed_ns: int = 0
    error: str = ""
    llb_calls: list[str] = field(default_factory=list)


class _Fail(Exception):
    def __init__(self, code: grpc.StatusCode, details: str,
                 trailers: Iterable[tuple[str, str | bytes]] = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, tuple(trailers)


class _Call:
    """Mutable bookkeeping for a call in flight; becomes a CallRecord when it ends."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, start: float) -> None:
        self.method = method
        self.metadata: MetadataPairs = tuple(
            (m.key, m.value) for m in (context.invocation_metadata() or ()))
        self.peer = context.peer() or ""
        self.ref = ""
        self.session = ""
        self.sharedkey = ""
        self.internal = False
        self.start = start

    def values(self, key: str) -> list[str | bytes]:
        return [v for k, v in self.metadata if k == key]

    def first(self, key: str) -> str:
        vals = self.values(key)
        return str(vals[0]) if vals else ""


def rfc3339nano(ns: int | None = None) -> str:
    """Go's time.RFC3339Nano in UTC (fraction without trailing zeros)."""
    ns = time.time_ns() if ns is None else ns
    sec, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fs = f"{frac:09d}".rstrip("0")
    return f"{base}.{fs}Z" if fs else f"{base}Z"


def _ts(ns: int) -> cpb.Timestamp:
    return cpb.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def error_details(n: int = ECHO_ERROR_DEFAULT) -> bytes:
    """Deterministic `grpc-status-details-bin` value of exactly n bytes.

    When n is big enough it is a valid google.rpc.Status{code=9, message, details=[Any{padding}]},
    so clients that parse it do not choke; tiny n gives a plain byte pattern.
    """
    head = b"\x08\x09" + b"\x12" + _varint(18) + b"deliberate failure"
    type_url = b"type.googleapis.com/test.Padding"
    for pad in range(n, -1, -1):
        body = b"\x0a" + _varint(len(type_url)) + type_url + b"\x12" + _varint(pad)
        any_len = len(body) + pad
        total = len(head) + 1 + len(_varint(any_len)) + any_len
        if total == n:
            padding = bytes((i * 31 + 7) & 0xFF for i in range(pad))
            return head + b"\x1a" + _varint(any_len) + body + padding
        if total < n:
            break
    return bytes((i * 13 + 5) & 0xFF for i in range(n))


class FakeReplica:
    """A fake buildkitd. See the module docstring for the design."""

    def __init__(self, name: str, *, limits: JoinLimits = JoinLimits(),
                 solve_delay: float = 0.0,
                 server_options: Iterable[tuple[str, Any]] = ()) -> None:
        self.name = name
        self.limits = limits
        self.server_options = tuple(server_options)  # extra grpc.aio server options
        self.solve_delay = solve_delay
        # When set, a Solve also waits for this event after its delay: the test, not the
        # clock, decides when running builds end.
        self.hold: asyncio.Event | None = None
        self.address = ""
        self.records: list[CallRecord] = []
        self.sessions: dict[str, SessionState] = {}
        self.jobs: dict[str, Job] = {}  # running builds by ref
        self.history: dict[str, Job] = {}  # finished non-internal builds by ref
        self._server: grpc.aio.Server | None = None
        self._changed = asyncio.Event()
        self._inflight: Counter[str] = Counter()
        self._calls: set[_Call] = set()
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._results = itertools.count(1)
        self._handlers = self._build_handlers()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                    tls: grpc.ServerCredentials | None = None) -> str:
        """Listen (plain h2c, or TLS with `tls`, as buildkitd --tlscert) and return
        'host:port'."""
        server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_metadata_size", MAX_METADATA),
            ("grpc.absolute_max_metadata_size", MAX_METADATA),
            ("grpc.so_reuseport", 0),
            *self.server_options,
        ])
        server.add_generic_rpc_handlers((_Dispatch(self),))
        bind_host = f"[{host}]" if ":" in host else host
        bound = (server.add_secure_port(f"{bind_host}:{port}", tls) if tls is not None
                 else server.add_insecure_port(f"{bind_host}:{port}"))
        await server.start()
        self._server = server
        self.address = f"{bind_host}:{bound}"
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving; in-flight calls get `grace` seconds, then are cancelled."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)

    async def __aenter__(self) -> FakeReplica:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(None)

    # ------------------------------------------------------------------ test helpers

    def refs_seen(self) -> set[str]:
        """Build refs of every call received so far (finished or in flight)."""
        return {c.ref for c in self._all_calls() if c.ref}

    def sessions_seen(self) -> set[str]:
        """Session ids named by any call received so far."""
        seen = {c.session for c in self._all_calls() if c.session}
        return seen | set(self.sessions)

    def _all_calls(self) -> list[CallRecord | _Call]:
        return [*self.records, *self._calls]

    def active_builds(self, *, include_internal: bool = True) -> list[str]:
        """Refs of Solves currently running."""
        return [r for r, j in self.jobs.items() if include_internal or not j.internal]

    def active_sessions(self) -> list[str]:
        return [s.id for s in self.sessions.values() if s.active]

    def inflight(self) -> Counter[str]:
        """Method path -> number of calls currently being handled."""
        return +self._inflight

    def calls(self, method: str) -> list[CallRecord]:
        """Finished calls of one method (full path, or the part after the last '/')."""
        return [r for r in self.records if _method_matches(r.method, method)]

    async def wait_for(self, predicate: Callable[[], bool],
                       timeout: float) -> None:
        """Wait until predicate() holds (re-checked on every state change), or TimeoutError."""
        if not await self._wait(predicate, timeout):
            raise TimeoutError(f"{self.name}: condition not met within {timeout}s")

    async def wait_record(self, predicate: Callable[[CallRecord], bool],
                          timeout: float) -> CallRecord:
        """Wait for a finished call matching predicate and return its record."""
        found: list[CallRecord] = []

        def check() -> bool:
            found[:] = [r for r in self.records if predicate(r)][:1]
            return bool(found)

        await self.wait_for(check, timeout)
        return found[0]

    async def wait_cancelled(self, method: str,
                             timeout: float) -> CallRecord:
        """Wait until a call of `method` ended cancelled (client cancel or server stop)."""
        return await self.wait_record(
            lambda r: r.outcome == "cancelled" and _method_matches(r.method, method), timeout)

    # ------------------------------------------------------------------ internals

    def _notify(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def _wait(self, predicate: Callable[[], object], limit: float | None) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        while True:
            if predicate():
                return True
            ev = self._changed
            if deadline is None:
                await ev.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return bool(predicate())
            try:
                async with asyncio.timeout(remaining):
                    await ev.wait()
            except TimeoutError:
                return bool(predicate())

    def _finish(self, call: _Call, outcome: str) -> None:
        self._calls.discard(call)
        self._inflight[call.method] -= 1
        self.records.append(CallRecord(
            replica=self.name, method=call.method, ref=call.ref, session=call.session,
            sharedkey=call.sharedkey, internal=call.internal, peer=call.peer,
            outcome=outcome, metadata=call.metadata, started=call.start,
            ended=asyncio.get_running_loop().time()))
        self._notify()

    def _wrap(self, method: str, impl: Callable[[_Call, Any, grpc.aio.ServicerContext],
                                                Awaitable[_T]]
              ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[_T]]:
        """Run impl with recording; _Fail becomes context.abort with its trailers."""

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> _T:
            call = _Call(method, context, asyncio.get_running_loop().time())
            self._calls.add(call)
            self._inflight[method] += 1
            self._notify()
            try:
                result = await impl(call, request, context)
            except _Fail as f:
                self._finish(call, f.code.name)
                await context.abort(f.code, f.details, f.trailers)
                raise AssertionError("unreachable") from None
            except asyncio.CancelledError:
                self._finish(call, "cancelled")
                raise
            except Exception as e:  # a bug in the fake: make it loud
                self._finish(call, "INTERNAL")
                await context.abort(grpc.StatusCode.INTERNAL, f"fake replica bug: {e!r}")
                raise AssertionError("unreachable") from None
            self._finish(call, "ok")
            return result

        return handler

    def _build_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        uu = grpc.unary_unary_rpc_method_handler
        us = grpc.unary_stream_rpc_method_handler
        su = grpc.stream_unary_rpc_method_handler
        ss = grpc.stream_stream_rpc_method_handler
        table: dict[str, tuple[Callable[..., grpc.RpcMethodHandler], Callable[..., Any]]] = {
            CONTROL + "Session": (ss, self._session),
            CONTROL + "Solve": (uu, self._solve),
            CONTROL + "Status": (us, self._status),
            CONTROL + "ListWorkers": (uu, self._list_workers),
            CONTROL + "Info": (uu, self._info),
            CONTROL + "DiskUsage": (uu, self._disk_usage),
            CONTROL + "Prune": (us, self._prune),
            CONTROL + "ListenBuildHistory": (us, self._listen_history),
            CONTROL + "UpdateBuildHistory": (uu, self._update_history),
            CONTENT + "Info": (uu, self._content_info),
            LLB + "Ping": (uu, self._llb_ping),
            LLB + "Solve": (uu, self._llb_solve),
            LLB + "Return": (uu, self._llb_return),
            HEALTH + "Check": (uu, self._health_check),
            HEALTH + "Watch": (us, self._health_watch),
            ECHO + "Unary": (uu, self._echo_unary),
            ECHO + "ServerStream": (us, self._echo_server_stream),
            ECHO + "Download": (us, self._echo_download),
            ECHO + "ClientStream": (su, self._echo_client_stream),
            ECHO + "Bidi": (ss, self._echo_bidi),
            ECHO + "Error": (uu, self._echo_error),
            ECHO + "Hang": (uu, self._echo_hang),
        }
        return {path: factory(self._wrap(path, impl)) for path, (factory, impl) in table.items()}

    def handler_for(self, path: str) -> grpc.RpcMethodHandler:
        """The handler serving `path`; unknown paths get a recording UNIMPLEMENTED handler."""
        h = self._handlers.get(path)
        if h is not None:
            return h
        if path.startswith(LLB):
            return grpc.stream_stream_rpc_method_handler(self._wrap(path, self._llb_other))
        return grpc.stream_stream_rpc_method_handler(self._wrap(path, self._unknown))

    # ------------------------------------------------------------------ Control/Session

    async def _session(self, call: _Call, requests: Any, context: grpc.aio.ServicerContext
                       ) -> None:
        sid = call.first(SESSION_UUID)
        call.session = sid
        call.sharedkey = call.first(SESSION_SHAREDKEY)
        if not sid:
            raise _Fail(grpc.StatusCode.INVALID_ARGUMENT, "no session id in metadata")
        old = self.sessions.get(sid)
        if old is not None and old.active:
            raise _Fail(grpc.StatusCode.UNKNOWN, f"session {sid} already exists")
        st = SessionState(sid, call.sharedkey, tuple(str(v) for v in call.values(SESSION_METHOD)),
                          call.peer)
        self.sessions[sid] = st
        self._notify()
        try:
            async for raw in requests:
                data = cpb.BytesMessage.FromString(raw).data
                if data == UPLOAD_DONE:
                    st.upload_done = True
                    self._notify()
                    ack = cpb.BytesMessage(data=f"ack {st.bytes}".encode())
                    await context.write(ack.SerializeToString())
                else:
                    st.bytes += len(data)
            # EOF. grpcio reports a client RST_STREAM(CANCEL) to the handler as the same EOF a
            # half-close gives, and cancels the handler task only a little later. A write
            # fails deterministically on a reset stream and succeeds on a half-closed one, so
            # a final frame tells the two apart (and checks that the path back stays open
            # after the client's half-close, as the inner HTTP/2 connection's close would).
            try:
                await context.write(cpb.BytesMessage(data=SESSION_END).SerializeToString())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # e.g. ExecuteBatchError: the client reset the stream
                raise asyncio.CancelledError("client reset the session") from e
        finally:
            st.active = False
            self._notify()
        # Client half-closed: end the stream OK.

    # ------------------------------------------------------------------ Control/Solve

    async def _solve(self, call: _Call, request: bytes, context: grpc.aio.ServicerContext
                     ) -> bytes:
        req = cpb.SolveRequest.FromString(request)
        ref = req.Ref or new_id()
        call.ref, call.session, call.internal = ref, req.Session, req.Internal
        if ref in self.jobs:
            raise _Fail(grpc.StatusCode.UNKNOWN, f"job ID {ref} exists")
        attrs = dict(req.FrontendAttrs)
        job = Job(ref=ref, session=req.Session, internal=req.Internal,
                  bridge=req.Internal or (not req.Frontend and not req.Definition),
                  frontend_attrs=attrs, created_ns=time.time_ns())
        self.jobs[ref] = job
        self._publish(HISTORY_STARTED, job)
        self._notify()
        try:
            response = await self._run_job(job, req, attrs)
        except _Fail as f:
            job.error = f.details
            raise
        except asyncio.CancelledError:
            job.error = "context canceled"
            raise
        finally:
            job.completed_ns = time.time_ns()
            del self.jobs[ref]
            if not job.internal:
                self.history[ref] = job
                self._publish(HISTORY_COMPLETE, job)
            job.done.set()
            self._notify()
        return response

    async def _run_job(self, job: Job, req: cpb.SolveRequest, attrs: dict[str, str]) -> bytes:
        shared = [v for k, v in sorted(attrs.items()) if k.startswith(LOCAL_SESSION_PREFIX)]
        sids = list(dict.fromkeys(s for s in [req.Session, *shared] if s))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.session
        for sid in sids:
            ok = await self._wait(functools.partial(self._session_active, sid),
                                  deadline - loop.time())
            if not ok:
                raise _Fail(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no active session for {sid}: context deadline exceeded")
        for sid in sids:
            st = self.sessions[sid]
            await self._wait(functools.partial(_upload_settled, st), None)
            if not st.upload_done:
                raise _Fail(grpc.StatusCode.UNKNOWN,
                            f"session {sid} closed before the upload finished")
        if job.bridge:
            await job.returned.wait()
        delay = float(req.FrontendAttrs.get(BUILD_SECONDS, self.solve_delay))
        if delay:
            await asyncio.sleep(delay)  # simulated build time
        if self.hold is not None:
            await self.hold.wait()
        exporter = {"replica": self.name,
                    "uploaded": str(self.sessions[req.Session].bytes if req.Session else 0)}
        if shared:
            exporter["shared_uploaded"] = str(
                sum(self.sessions[s].bytes for s in dict.fromkeys(shared)))
        return cpb.SolveResponse(ExporterResponse=exporter).SerializeToString()

    def _session_active(self, sid: str) -> bool:
        st = self.sessions.get(sid)
        return st is not None and st.active

    # ------------------------------------------------------------------ Control/Status

    def _vertex(self, job: Job, *, completed: bool) -> cpb.Vertex:
        name = f"[{self.name}] build"
        digest = "sha256:" + hashlib.sha256((job.ref + self.name).encode()).hexdigest()
        v = cpb.Vertex(digest=digest, name=name, started=_ts(job.created_ns))
        if completed:
            v.completed.CopyFrom(_ts(job.completed_ns))
            v.error = job.error
        return v

    async def _status(self, call: _Call, request: bytes, context: grpc.aio.ServicerContext
                      ) -> None:
        ref = cpb.StatusRequest.FromString(request).Ref
        call.ref = ref
        await context.send_initial_metadata(((CURRENT_TIMESTAMP, rfc3339nano()),))
        found = await self._wait(lambda: ref in self.jobs or ref in self.history,
                                 self.limits.status)
        if not found:
            raise _Fail(grpc.StatusCode.NOT_FOUND, f"no such job {ref}")
        job = self.jobs.get(ref) or self.history[ref]
        call.session, call.internal = job.session, job.internal
        await context.write(
            cpb.StatusResponse(vertexes=[self._vertex(job, completed=False)]).SerializeToString())
        await job.done.wait()
        await context.write(
            cpb.StatusResponse(vertexes=[self._vertex(job, completed=True)]).SerializeToString())

    # ------------------------------------------------------------------ LLBBridge

    async def _llb_job(self, call: _Call, method: str) -> Job:
        name = method.rsplit("/", 1)[-1]
        ids = call.values(BUILD_ID)
        if len(ids) != 1:
            raise _Fail(grpc.StatusCode.UNKNOWN, f"forwarding {name}: no buildid found in context")
        ref = str(ids[0])
        call.ref = ref

        def registered() -> bool:
            j = self.jobs.get(ref)
            return j is not None and j.bridge

        if not await self._wait(registered, self.limits.llb):
            raise _Fail(grpc.StatusCode.NOT_FOUND, f"forwarding {name}: no such job {ref}")
        job = self.jobs[ref]
        call.session, call.internal = job.session, job.internal
        job.llb_calls.append(name)
        return job

    async def _llb_ping(self, call: _Call, request: bytes, context: Any) -> bytes:
        await self._llb_job(call, LLB + "Ping")
        return gpb.PongResponse().SerializeToString()

    async def _llb_solve(self, call: _Call, request: bytes, context: Any) -> bytes:
        gpb.SolveRequest.FromString(request)
        await self._llb_job(call, LLB + "Solve")
        result = gpb.Result(ref=f"{self.name}-result-{next(self._results)}")
        return gpb.SolveResponse(result=result).SerializeToString()

    async def _llb_return(self, call: _Call, request: bytes, context: Any) -> bytes:
        gpb.ReturnRequest.FromString(request)
        job = await self._llb_job(call, LLB + "Return")
        job.returned.set()
        self._notify()
        return gpb.ReturnResponse().SerializeToString()

    async def _llb_other(self, call: _Call, requests: Any, context: grpc.aio.ServicerContext
                         ) -> None:
        """Other LLBBridge methods: forwarder checks, then an empty response message."""
        await self._llb_job(call, call.method)
        async for _ in requests:
            pass
        if not call.method.endswith("/ExecProcess"):
            await context.write(b"")

    # ------------------------------------------------------------------ global calls

    def _usage(self) -> list[cpb.UsageRecord]:
        return [cpb.UsageRecord(ID=f"{self.name}-a", Size=1024),
                cpb.UsageRecord(ID=f"{self.name}-b", Size=2048)]

    async def _list_workers(self, call: _Call, request: bytes, context: Any) -> bytes:
        cpb.ListWorkersRequest.FromString(request)
        rec = cpb.WorkerRecord(ID=self.name, Labels={"replica": self.name},
                               platforms=[cpb.Platform(Architecture="amd64", OS="linux")])
        return cpb.ListWorkersResponse(record=[rec]).SerializeToString()

    async def _info(self, call: _Call, request: bytes, context: Any) -> bytes:
        version = cpb.BuildkitVersion(package="fake/" + self.name, version="v0.fake",
                                      revision=self.name)
        return cpb.InfoResponse(buildkitVersion=version).SerializeToString()

    async def _disk_usage(self, call: _Call, request: bytes, context: Any) -> bytes:
        cpb.DiskUsageRequest.FromString(request)
        return cpb.DiskUsageResponse(record=self._usage()).SerializeToString()

    async def _prune(self, call: _Call, request: bytes, context: grpc.aio.ServicerContext
                     ) -> None:
        cpb.PruneRequest.FromString(request)
        for rec in self._usage():
            await context.write(rec.SerializeToString())

    def _event(self, kind: int, job: Job) -> bytes:
        rec = cpb.BuildHistoryRecord(Ref=job.ref, CreatedAt=_ts(job.created_ns))
        if job.completed_ns:
            rec.CompletedAt.CopyFrom(_ts(job.completed_ns))
        return cpb.BuildHistoryEvent(type=kind, record=rec).SerializeToString()

    def _publish(self, kind: int, job: Job) -> None:
        if job.internal:
            return
        for q in self._subscribers:
            q.put_nowait(self._event(kind, job))

    async def _listen_history(self, call: _Call, request: bytes,
                              context: grpc.aio.ServicerContext) -> None:
        """Snapshot (STARTED for running, COMPLETE for finished), then live events unless
        EarlyExit. With Ref: only that build; an unknown Ref ends at once (non-owner)."""
        req = cpb.BuildHistoryRequest.FromString(request)
        call.ref = req.Ref
        await context.send_initial_metadata(((CURRENT_TIMESTAMP, rfc3339nano()),))
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._subscribers.add(queue)  # subscribe before the snapshot: no gap
        try:
            if req.Ref:
                job = self.jobs.get(req.Ref) or self.history.get(req.Ref)
                if job is None or job.internal:
                    return
                running = req.Ref in self.jobs
                await context.write(
                    self._event(HISTORY_STARTED if running else HISTORY_COMPLETE, job))
                if req.EarlyExit or not running:
                    return
                await job.done.wait()
                await context.write(self._event(HISTORY_COMPLETE, job))
                return
            for job in list(self.jobs.values()):
                if not job.internal:
                    await context.write(self._event(HISTORY_STARTED, job))
            if not req.ActiveOnly:
                for job in list(self.history.values()):
                    await context.write(self._event(HISTORY_COMPLETE, job))
            if req.EarlyExit:
                return
            while True:
                await context.write(await queue.get())
        finally:
            self._subscribers.discard(queue)

    async def _update_history(self, call: _Call, request: bytes, context: Any) -> bytes:
        """UpdateBuildHistory of a build this replica ran (Delete removes it), else NotFound."""
        req = cpb.UpdateBuildHistoryRequest.FromString(request)
        call.ref = req.Ref
        if req.Ref not in self.history:
            raise _Fail(grpc.StatusCode.NOT_FOUND, f"no such job {req.Ref}")
        if req.Delete:
            del self.history[req.Ref]
        return b""

    async def _content_info(self, call: _Call, request: bytes, context: Any) -> bytes:
        """containerd Content.Info: answered by a replica with any build history (the blobs
        of its builds live there), NotFound elsewhere."""
        if not self.history:
            raise _Fail(grpc.StatusCode.NOT_FOUND, "content digest not found")
        return b""

    async def _health_check(self, call: _Call, request: bytes, context: Any) -> bytes:
        return b"\x08\x01"  # HealthCheckResponse{status: SERVING}

    async def _health_watch(self, call: _Call, request: bytes,
                            context: grpc.aio.ServicerContext) -> None:
        await context.write(b"\x08\x01")
        await asyncio.Future()  # until cancelled

    async def _unknown(self, call: _Call, requests: Any, context: Any) -> None:
        service, _, method = call.method.lstrip("/").rpartition("/")
        known = {p.lstrip("/").rpartition("/")[0] for p in self._handlers}
        if service in known:
            raise _Fail(grpc.StatusCode.UNIMPLEMENTED,
                        f"unknown method {method} for service {service}")
        raise _Fail(grpc.StatusCode.UNIMPLEMENTED, f"unknown service {service}")

    # ------------------------------------------------------------------ /test.Echo

    @staticmethod
    def _echo_trailers(call: _Call) -> tuple[tuple[str, str | bytes], ...]:
        return tuple((k, v) for k, v in call.metadata if k.startswith("x-echo-"))

    async def _echo_unary(self, call: _Call, request: bytes,
                          context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata(self._echo_trailers(call))
        return request

    async def _echo_download(self, call: _Call, request: bytes,
                             context: grpc.aio.ServicerContext) -> None:
        """A large server stream, as containerd's Content.Read of a blob: the request is the
        size as 8 bytes big-endian; the answer comes in 64 KiB messages."""
        left = int.from_bytes(request[:8], "big")
        chunk = b"d" * DOWNLOAD_CHUNK
        while left > 0:
            await context.write(chunk[:left])
            left -= DOWNLOAD_CHUNK

    async def _echo_server_stream(self, call: _Call, request: bytes,
                                  context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata(self._echo_trailers(call))
        for _ in range(3):
            await context.write(request)

    async def _echo_client_stream(self, call: _Call, requests: Any,
                                  context: grpc.aio.ServicerContext) -> bytes:
        context.set_trailing_metadata(self._echo_trailers(call))
        return b"".join([m async for m in requests])

    async def _echo_bidi(self, call: _Call, requests: Any,
                         context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata(self._echo_trailers(call))
        async for m in requests:
            await context.write(m)

    async def _echo_error(self, call: _Call, request: bytes, context: Any) -> bytes:
        """FAILED_PRECONDITION with a details trailer of N bytes: N is the request's 4-byte
        big-endian prefix, or ECHO_ERROR_DEFAULT (40 KiB) for shorter requests."""
        n = int.from_bytes(request[:4], "big") if len(request) >= 4 else ECHO_ERROR_DEFAULT
        trailers = (("grpc-status-details-bin", error_details(n)), *self._echo_trailers(call))
        raise _Fail(grpc.StatusCode.FAILED_PRECONDITION, "deliberate failure", trailers)

    async def _echo_hang(self, call: _Call, request: bytes, context: Any) -> bytes:
        await asyncio.Future()  # until cancelled
        raise AssertionError("unreachable")


def _upload_settled(st: SessionState) -> bool:
    return st.upload_done or not st.active


def _method_matches(path: str, method: str) -> bool:
    return path == method or ("/" not in method and path.rsplit("/", 1)[-1] == method)


class _Dispatch(grpc.GenericRpcHandler):
    """Serves every path (so unknown ones are recorded too)."""

    def __init__(self, replica: FakeReplica) -> None:
        self._replica = replica

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._replica.handler_for(handler_call_details.method)


__all__ = [
    "ECHO_ERROR_DEFAULT", "CallRecord", "FakeReplica", "Job", "JoinLimits", "SessionState",
    "error_details", "rfc3339nano",
]
