"""Small (unary) calls: direct vs HAProxy `mode tcp` vs buildkit-gateway, and the gateway under
many idle connections and builds in flight.

Legs (each a separate process, loopback only, free ports), as in bench/upload.py:

| leg | path |
|---|---|
| `direct` | client -> sink (bench/sink.py) |
| `haproxy` | client -> HAProxy `mode tcp` (upload.haproxy_config) -> sink |
| `gateway` | client -> `buildkit-gateway --listen L --replica SINK --admin-listen A` -> sink |

The calls (request bytes in, reply bytes out, raw method handlers):

| name | path | what the gateway does with it |
|---|---|---|
| ListWorkers | /moby.buildkit.v1.Control/ListWorkers | answers from the probe's cache |
| Info | /moby.buildkit.v1.Control/Info | answers from the probe's cache |
| Health | /grpc.health.v1.Health/Check | answers SERVING while a replica is ready |
| Content/Info | /containerd.services.content.v1.Content/Info {digest} | relays it to a replica |

The three control-class calls (gateway/buildkit/wire.py) never reach the replica: the gateway
answers them itself (its relay from the cached answers, or its in-process grpc.aio control server
over a unix socket, depending on the gateway's version). Content/Info with no build known on the
connection is routed by placement's `other` (the connection's fallback key: the client's
address) to the sink, so it is the relayed call (containerd's content service is what buildkitd
serves; there is no /moby.buildkit.v1.Content service).

Default mode (`--rounds 3 --calls 3000`): each round runs the legs in turn (direct, haproxy,
gateway, direct, ...), each leg-round in a fresh client process (this script with --worker): one
grpc.aio channel (one HTTP/2 connection) to the leg; per call, `--warmup` calls, then `--calls`
calls by 64 concurrent callers on that channel (calls/s; the proxy's CPU per call from /proc),
then `--latency-calls` sequential calls by one caller (p50, p99). Medians over the rounds; ratios
against direct and gateway/haproxy; SUMMARY lines; --json FILE. Then one more client process
measures one caller's latency interleaved: a channel per leg, each step one call on every leg in
rotating order, and the added latency of a leg is the median over the steps of (its time -
direct's time in the same step), so drift in the machine's load weighs on all legs alike.

Idle mode (`--idle N --inflight M`): sink + gateway only (its --max-connections and
--max-connections-per-client raised to fit). The gateway's RSS (VmRSS) and one caller's p50/p99 of
Content/Info (relayed) and ListWorkers (cached), through the gateway and direct to the sink, are
measured with nothing open; then N idle HTTP/2 connections are opened (preface + empty SETTINGS,
the server's SETTINGS read and acknowledged, then nothing) and M builds put in flight (each on
its own connection, as buildctl: `Control/Session` with the session headers, kept open, and a
`Control/Solve` naming it, which the sink answers only once the session ended); the gateway must
report M active builds on /api/status; RSS and latencies again; then the sessions are ended (each
Solve must complete OK), every connection closed, and RSS read once more.

  .venv/bin/python bench/calls.py [--rounds 3] [--calls 3000] [--latency-calls 1000]
      [--warmup 300] [--concurrency 64] [--legs direct,haproxy,gateway] [--json FILE]
  .venv/bin/python bench/calls.py --idle 2000 --inflight 200 [--latency-calls 1000] [--json FILE]
  bash bench/run-calls [options]          the same, under a total time limit (BENCH_TIME_LIMIT)

Bounded: every call has a deadline (--call-timeout), every client process a time limit, no new
leg-round starts after --deadline s, and the whole run is cancelled after --time-limit s; every
process started is stopped on exit, SIGINT, SIGTERM and SIGHUP (and dies with this one:
PR_SET_PDEATHSIG). Nothing here asserts timings: it prints.
"""

# ruff: noqa: ASYNC240
# (a benchmark driver: blocking process and file calls happen outside the timed calls)

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sink import (
    ACK,
    DATA,
    END_STREAM,
    GOAWAY,
    PING,
    PREFACE,
    SETTINGS,
    U32,
    frame,
    pb_bytes,
    settings_frame,
)
from upload import (
    Leg,
    Payload,
    Proc,
    UploadClient,
    UploadError,
    _child_setup,
    _descendants,
    cpu_seconds,
    fmt,
    free_port,
    gateway_argv,
    random_id,
    start_gateway,
    start_haproxy,
    stoppable,
)

BENCH_DIR = Path(__file__).resolve().parent
DIGEST = "sha256:" + "ab" * 32
CALLS: dict[str, tuple[str, bytes, str]] = {
    # name: (path, request, what the gateway does with it)
    "ListWorkers": ("/moby.buildkit.v1.Control/ListWorkers", b"", "cached answer"),
    "Info": ("/moby.buildkit.v1.Control/Info", b"", "cached answer"),
    "Health": ("/grpc.health.v1.Health/Check", b"", "own answer"),
    "Content/Info": (
        "/containerd.services.content.v1.Content/Info",
        pb_bytes(1, DIGEST.encode()),  # InfoRequest{digest}
        "relayed to the replica",
    ),
}
LEG_ORDER = ("direct", "haproxy", "gateway")
RELAYED, CACHED = "Content/Info", "ListWorkers"  # the idle mode's two calls


def _reply_ok(name: str, reply: bytes) -> bool:
    """The sink's (and the gateway's cached) answers: see sink._canned_reply."""
    if name == "ListWorkers":
        return b"bench-sink-worker" in reply
    if name == "Info":
        return b"v0.0.0-bench-sink" in reply
    if name == "Health":
        return reply == b"\x08\x01"  # SERVING
    return True


# ----------------------------------------------------------------------------------------
# the client process (--worker): one grpc.aio channel to one leg


def _pct(xs: list[float], q: int) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


async def worker(args: argparse.Namespace) -> int:
    import grpc  # only the client processes load grpc

    options = [("grpc.enable_http_proxy", 0), ("grpc.primary_user_agent", "bench-calls")]
    out: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.port}", options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), args.call_timeout)
        for name in args.only:
            path, request, _ = CALLS[name]
            fn = channel.unary_unary(path)  # no serializers: bytes in, bytes out
            errors: list[str] = []

            async def one(name: str = name, fn: Any = fn, request: bytes = request,
                          errors: list[str] = errors) -> bool:
                try:
                    reply = await fn(request, timeout=args.call_timeout)
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")
                    return False
                if not _reply_ok(name, reply):
                    errors.append(f"unexpected reply {reply[:40]!r}")
                    return False
                return True

            async def burst(n: int, one: Any = one) -> float:
                left = n

                async def caller() -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await one()

                t0 = time.perf_counter()
                await asyncio.gather(*(caller() for _ in range(min(args.concurrency, n))))
                return time.perf_counter() - t0

            res: dict[str, Any] = {}
            if args.warmup:
                await burst(args.warmup)
            if args.calls:
                c0 = cpu_seconds(args.proxy_pid)[0] if args.proxy_pid else None
                s0 = cpu_seconds(args.sink_pid)[0] if args.sink_pid else None
                own0 = time.process_time()
                n_err = len(errors)
                secs = await burst(args.calls)
                own1 = time.process_time()
                ok = args.calls - (len(errors) - n_err)
                res["calls"] = args.calls
                res["ok"] = ok
                res["seconds"] = secs
                res["calls_per_s"] = ok / secs if secs > 0 else None
                if c0 is not None:
                    res["proxy_cpu_us_per_call"] = (
                        (cpu_seconds(args.proxy_pid)[0] - c0) / args.calls * 1e6)
                if s0 is not None:
                    res["sink_cpu_us_per_call"] = (
                        (cpu_seconds(args.sink_pid)[0] - s0) / args.calls * 1e6)
                res["client_cpu_us_per_call"] = (own1 - own0) / args.calls * 1e6
            if args.latency_calls:
                lat: list[float] = []
                for _ in range(args.latency_calls):
                    t0 = time.perf_counter_ns()
                    if await one():
                        lat.append((time.perf_counter_ns() - t0) / 1e6)
                res["latency_calls"] = args.latency_calls
                res["p50_ms"] = _pct(lat, 50)
                res["p99_ms"] = _pct(lat, 99)
                res["mean_ms"] = statistics.fmean(lat) if lat else None
            res["errors"] = len(errors)
            res["error_examples"] = list(dict.fromkeys(errors))[:3]
            out[name] = res
    print("RESULT " + json.dumps(out), flush=True)
    return 0


async def interleaved_worker(args: argparse.Namespace) -> int:
    """One caller, one channel per leg: each step makes the same call once on every leg, the
    legs' order rotating from step to step, so whatever else the machine does at a moment
    weighs on all legs alike. Per leg and call: p50 of its own times, and the median over the
    steps of (its time - direct's time in the same step): the latency it adds."""
    import grpc

    options = [("grpc.enable_http_proxy", 0), ("grpc.primary_user_agent", "bench-calls")]
    ports = dict(item.split("=", 1) for item in args.ports.split(","))
    legs = [leg for leg in LEG_ORDER if leg in ports]
    out: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        channels = {}
        for leg in legs:
            channels[leg] = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{ports[leg]}", options=options))
            await asyncio.wait_for(channels[leg].channel_ready(), args.call_timeout)
        for name in args.only:
            path, request, _ = CALLS[name]
            fns = {leg: channels[leg].unary_unary(path) for leg in legs}
            for leg in legs:  # warm-up
                for _ in range(min(args.warmup, 200)):
                    await fns[leg](request, timeout=args.call_timeout)
            times: dict[str, list[float]] = {leg: [] for leg in legs}
            added: dict[str, list[float]] = {leg: [] for leg in legs if leg != "direct"}
            errors = 0
            for step in range(args.latency_calls):
                k = step % len(legs)
                took: dict[str, float] = {}
                for leg in legs[k:] + legs[:k]:
                    t0 = time.perf_counter_ns()
                    try:
                        reply = await fns[leg](request, timeout=args.call_timeout)
                    except grpc.aio.AioRpcError:
                        errors += 1
                        continue
                    t1 = time.perf_counter_ns()
                    if _reply_ok(name, reply):
                        took[leg] = (t1 - t0) / 1e6
                    else:
                        errors += 1
                for leg, ms in took.items():
                    times[leg].append(ms)
                    if leg != "direct" and "direct" in took:
                        added[leg].append(ms - took["direct"])
            out[name] = {
                "steps": args.latency_calls, "errors": errors,
                "p50_ms": {leg: _pct(xs, 50) for leg, xs in times.items()},
                "added_ms": {leg: statistics.median(xs) if xs else None
                             for leg, xs in added.items()},
            }
    print("RESULT " + json.dumps(out), flush=True)
    return 0


_workers: set[asyncio.subprocess.Process] = set()


async def run_worker(
    args: argparse.Namespace,
    port: int,
    only: list[str],
    *,
    calls: int,
    latency_calls: int,
    proxy_pid: int | None = None,
    sink_pid: int | None = None,
    ports: str = "",
) -> dict[str, Any]:
    """One client process against one port (or, with `ports`, the interleaved latency run
    against every leg); returns its per-call results (raises on failure)."""
    argv = [
        sys.executable, "-u", str(Path(__file__).resolve()), "--worker",
        "--port", str(port), "--only", ",".join(only),
        "--calls", str(calls), "--latency-calls", str(latency_calls),
        "--warmup", str(args.warmup), "--concurrency", str(args.concurrency),
        "--call-timeout", str(args.call_timeout),
    ]
    if proxy_pid:
        argv += ["--proxy-pid", str(proxy_pid)]
    if sink_pid:
        argv += ["--sink-pid", str(sink_pid)]
    if ports:
        argv += ["--ports", ports]
    p = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=_child_setup,
    )
    _workers.add(p)
    try:
        async with asyncio.timeout(args.worker_timeout):
            stdout, stderr = await p.communicate()
    except TimeoutError:
        raise UploadError(f"client process did not finish within {args.worker_timeout:.0f} s"
                          ) from None
    finally:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 5)
        _workers.discard(p)
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    tail = "\n".join(stderr.decode(errors="replace").strip().splitlines()[-5:])
    raise UploadError(f"client process exited {p.returncode} without a result: {tail}")


def _kill_workers() -> None:
    for p in list(_workers):
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()


# ----------------------------------------------------------------------------------------
# processes: sink, haproxy, gateway


async def start_sink(tmp: Path) -> tuple[Proc, int]:
    sink = Proc(
        "sink",
        [sys.executable, str(BENCH_DIR / "sink.py"), "--port", "0"],
        tmp / "sink.log",
        stdout=subprocess.PIPE,
    )
    assert sink.p.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(sink.p.stdout.readline), 15)
    if not line.startswith(b"SINK READY"):
        sink.stop()
        raise UploadError(f"sink failed to start: {line!r}\n{sink.tail()}")
    return sink, int(line.split()[2])


async def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    """GET on the admin server (plain HTTP/1.1, no proxies): (status, body)."""
    async with asyncio.timeout(timeout):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    "Connection: close\r\n\r\n".encode())
            raw = await r.read()
        finally:
            w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace")


async def api_status(admin: int) -> dict[str, Any]:
    status, body = await http_get(admin, "/api/status")
    if status != 200:
        raise UploadError(f"/api/status answered {status}")
    return dict(json.loads(body))


def gateway_numbers(doc: dict[str, Any]) -> dict[str, Any]:
    """Clients, active builds and open streams from an /api/status document."""
    replicas = [r for p in doc.get("pools", []) for r in p.get("replicas", [])]
    gw = doc.get("gateway", {})
    return {
        "clients": gw.get("clients"),
        "active_builds": sum(int(r.get("active_builds", 0)) for r in replicas),
        "queued": sum(len(p.get("queue", [])) for p in doc.get("pools", [])),
        "streams": gw.get("streams"),
    }


async def launch_gateway(
    leg: Leg, args: argparse.Namespace, tmp: Path, sink_port: int, extra: list[str]
) -> int:
    """upload.start_gateway with an admin port and `extra` flags; waits for /readyz 200.
    Returns the admin port (the leg is marked skipped on failure)."""
    base = gateway_argv(args)
    if base is None:
        leg.skipped = "buildkit-gateway not found next to this python or on PATH"
        return 0
    admin = free_port()
    flags = ["--admin-listen", f"127.0.0.1:{admin}", *extra]
    ns = argparse.Namespace(gateway_cmd=shlex.join([*base, *flags]),
                            ready_timeout=args.ready_timeout)
    await start_gateway(leg, ns, tmp, sink_port)
    if leg.skipped:
        return 0
    deadline = time.monotonic() + args.ready_timeout
    last = ""
    while time.monotonic() < deadline:
        if leg.proc is not None and not leg.proc.alive():
            leg.skipped = f"buildkit-gateway exited ({leg.proc.p.returncode})\n{leg.proc.tail()}"
            return 0
        try:
            status, body = await http_get(admin, "/readyz", 2)
            if status == 200:
                return admin
            last = f"{status} {body.strip()}"
        except (OSError, TimeoutError) as e:
            last = repr(e)
        await asyncio.sleep(0.1)
    leg.skipped = f"/readyz did not answer 200 within {args.ready_timeout:.0f} s ({last})"
    return 0


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of pid plus its descendants (a --gateway-cmd may be a wrapper)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    key, _, val = line.partition(":")
                    if key in out:
                        out[key] += int(val.split()[0])
        except OSError:
            continue
    return out


def log_problems(proc: Proc | None, most: int = 6) -> tuple[int, list[str]]:
    """Warning/error lines of a gateway's text log: (count, a few distinct ones, the first
    traceback in full, up to 25 lines)."""
    if proc is None:
        return 0, []
    try:
        lines = proc.log.read_text(errors="replace").splitlines()
    except OSError:
        return 0, []
    bad = [i for i, ln in enumerate(lines)
           if ln.split(" ", 2)[1:2] in (["warning"], ["error"], ["critical"])]
    seen: dict[str, str] = {}
    for i in bad:
        seen.setdefault(" ".join(lines[i].split(" ")[1:4]), lines[i])
    shown = list(seen.values())[:most]
    tb = next((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), None)
    if tb is not None:
        shown += ["first traceback:", *lines[max(tb - 1, 0) : tb + 24]]
    return len(bad), shown


def gateway_source(args: argparse.Namespace) -> str:
    """Which gateway code runs: --gateway-cmd, or this checkout (the venv's editable install)
    at its commit, naming uncommitted changes under gateway/ (they are measured too)."""
    if args.gateway_cmd:
        return f"--gateway-cmd {args.gateway_cmd}"
    root = BENCH_DIR.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "gateway"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return f"checkout {root} (git unavailable)"
    files = [ln[3:] for ln in dirty if ln.strip()]
    if not files:
        return f"checkout {root} at {rev or '?'}, gateway/ unmodified"
    return (f"checkout {root} at {rev or '?'} plus uncommitted changes (measured too) in "
            f"{len(files)} file(s) under gateway/: {', '.join(files)}")


def stop_all(procs: list[Proc]) -> None:
    _kill_workers()
    for p in reversed(procs):
        p.stop()


# ----------------------------------------------------------------------------------------
# calls mode


def median_of(xs: list[float | None]) -> float | None:
    ys = [x for x in xs if x is not None]
    return statistics.median(ys) if ys else None


async def calls_mode(args: argparse.Namespace, t_start: float) -> tuple[int, dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    procs: list[Proc] = []
    legs = [Leg(n) for n in LEG_ORDER if n in args.legs]
    try:
        sink, sink_port = await start_sink(tmp)
        procs.append(sink)
        for lg in legs:
            if lg.name == "direct":
                lg.port = sink_port
                lg.note = f"sink on 127.0.0.1:{sink_port} (bench/sink.py, pid {sink.pid})"
            elif lg.name == "haproxy":
                await start_haproxy(lg, argparse.Namespace(haproxy=args.haproxy), tmp, sink_port)
            else:
                await launch_gateway(lg, args, tmp, sink_port, [])
            if lg.proc:
                procs.append(lg.proc)
            if lg.skipped:
                print(f"{lg.name}: SKIPPED: {lg.skipped}", flush=True)
        active = [lg for lg in legs if not lg.skipped]
        names = list(CALLS)
        if any(lg.name == "gateway" for lg in active):
            print(f"gateway code: {args.source}", flush=True)
        print(
            f"{len(names)} calls x {len(active)} legs, {args.rounds} round(s): per leg-round one "
            f"client process, one grpc.aio channel; {args.warmup} warm-up + {args.calls} calls by "
            f"{args.concurrency} concurrent callers, then {args.latency_calls} calls by one "
            "caller, per call", flush=True,
        )
        for rnd in range(args.rounds):
            for lg in active:
                if time.monotonic() - t_start > args.deadline:
                    lg.errors.append(f"round {rnd + 1}: not run (--deadline {args.deadline:.0f} s)")
                    continue
                if lg.proc and not lg.proc.alive():
                    lg.errors.append(f"{lg.proc.name} exited ({lg.proc.p.returncode})")
                    continue
                try:
                    res = await run_worker(
                        args, lg.port, names, calls=args.calls, latency_calls=args.latency_calls,
                        proxy_pid=lg.proc.pid if lg.proc else None, sink_pid=sink.pid)
                except (UploadError, OSError) as e:
                    lg.errors.append(str(e))
                    print(f"  round {rnd + 1} {lg.name:<8} FAILED: {e}", flush=True)
                    continue
                lg.runs.append({"round": rnd, "calls": res})
                parts = [
                    f"{n} {fmt(r.get('calls_per_s'), '.0f')}/s p50 {fmt(r.get('p50_ms'), '.3f')}"
                    + (f" ({r['errors']} errors)" if r.get("errors") else "")
                    for n, r in res.items()
                ]
                print(f"  round {rnd + 1} {lg.name:<8} " + ", ".join(parts), flush=True)
        interleaved: dict[str, Any] = {}
        alive = [lg for lg in active if lg.runs and (lg.proc is None or lg.proc.alive())]
        if (args.latency_calls and len(alive) > 1
                and time.monotonic() - t_start <= args.deadline):
            print(f"interleaved latency: one client process, one channel per leg, "
                  f"{args.latency_calls} steps per call", flush=True)
            try:
                interleaved = await run_worker(
                    args, 0, names, calls=0, latency_calls=args.latency_calls,
                    ports=",".join(f"{lg.name}={lg.port}" for lg in alive))
            except (UploadError, OSError) as e:
                print(f"  interleaved latency FAILED: {e}", flush=True)
        return report_calls(args, legs, procs, t_start, interleaved)
    finally:
        stop_all(procs)
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report_calls(
    args: argparse.Namespace, legs: list[Leg], procs: list[Proc], t_start: float,
    interleaved: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    by = {lg.name: lg for lg in legs}
    summary: dict[str, Any] = {}
    for lg in legs:
        per_call: dict[str, Any] = {}
        for name in CALLS:
            rs = [r["calls"][name] for r in lg.runs if name in r["calls"]]
            per_call[name] = {
                key: median_of([r.get(key) for r in rs])
                for key in ("calls_per_s", "p50_ms", "p99_ms", "mean_ms", "proxy_cpu_us_per_call",
                            "sink_cpu_us_per_call", "client_cpu_us_per_call")
            }
            per_call[name]["errors"] = sum(int(r.get("errors", 0)) for r in rs)
            per_call[name]["error_examples"] = sorted(
                {e for r in rs for e in r.get("error_examples", [])})[:3]
            per_call[name]["rounds"] = rs
        summary[lg.name] = {"skipped": lg.skipped, "note": lg.note, "errors": lg.errors,
                            "calls": per_call}

    def val(leg: str, name: str, key: str) -> float | None:
        lg = by.get(leg)
        if lg is None or lg.skipped or not lg.runs:
            return None
        v = summary[leg]["calls"][name][key]
        return float(v) if v is not None else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def diff(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    print(f"\npython {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"total {time.monotonic() - t_start:.0f} s")
    print(
        f"Unary calls: {args.calls} calls by {args.concurrency} concurrent callers on one "
        f"grpc.aio channel (after {args.warmup} warm-up calls), then {args.latency_calls} calls "
        f"by one caller; median of {args.rounds} interleaved round(s); a client process per "
        "leg-round"
    )
    hdr = (f"{'call':<13} {'leg':<8} {'calls/s':>8} {'x direct':>8} {'gw/hap':>7} {'p50 ms':>7} "
           f"{'p99 ms':>7} {'+p50 ms':>8} {'proxy us/call':>13} {'sink us':>7} {'client us':>9} "
           f"{'errors':>6}")
    print(hdr)
    print("-" * len(hdr))
    for name, (_, _, what) in CALLS.items():
        first = True
        for lg in legs:
            label = f"{name:<13}" if first else " " * 13
            first = False
            if lg.skipped or not lg.runs:
                why = (lg.skipped or "; ".join(lg.errors[-1:]) or "no run").splitlines()[0]
                print(f"{label} {lg.name:<8} SKIPPED: {why}")
                continue
            cps = val(lg.name, name, "calls_per_s")
            p50 = val(lg.name, name, "p50_ms")
            gw_hap = (ratio(cps, val("haproxy", name, "calls_per_s"))
                      if lg.name == "gateway" else None)
            added = diff(p50, val("direct", name, "p50_ms")) if lg.name != "direct" else None
            errs = summary[lg.name]["calls"][name]["errors"]
            print(
                f"{label} {lg.name:<8} {fmt(cps, '.0f'):>8} "
                f"{fmt(ratio(cps, val('direct', name, 'calls_per_s')), '.2f'):>8} "
                f"{fmt(gw_hap, '.2f'):>7} {fmt(p50, '.3f'):>7} "
                f"{fmt(val(lg.name, name, 'p99_ms'), '.3f'):>7} "
                f"{fmt(added, '+.3f'):>8} "
                f"{fmt(val(lg.name, name, 'proxy_cpu_us_per_call'), '.1f'):>13} "
                f"{fmt(val(lg.name, name, 'sink_cpu_us_per_call'), '.1f'):>7} "
                f"{fmt(val(lg.name, name, 'client_cpu_us_per_call'), '.1f'):>9} {errs:>6}"
            )
        print(f"{'':<13} (gateway: {what})")
    print(
        "calls/s = OK calls / wall time, 64 callers on one channel; x direct = calls/s over "
        "direct's; gw/hap = gateway calls/s over haproxy's.\np50/p99 = one caller, sequential "
        "calls; +p50 = p50 minus direct's p50. proxy us/call = on-CPU time of the proxy process "
        "(all threads, /proc/PID/task/*/schedstat) during the concurrent calls / calls; sink us "
        "the same of the sink, client us the client process's (process_time)."
    )
    for lg in legs:
        if lg.note:
            print(f"{lg.name}: {lg.note}")
        for e in lg.errors:
            print(f"{lg.name}: {e}")
        for name in CALLS:
            ex = summary[lg.name]["calls"][name]["error_examples"]
            if ex:
                print(f"{lg.name} {name} errors: {'; '.join(ex)}")
    gw = by.get("gateway")
    n_bad, examples = log_problems(gw.proc if gw else None)
    if gw is not None and gw.proc is not None:
        print(f"gateway log: {n_bad} warning/error line(s)"
              + "".join(f"\n    | {ln[:220]}" for ln in examples))
    summary["gateway_log_problems"] = {"count": n_bad, "examples": examples}
    summary["interleaved"] = interleaved
    if interleaved:
        print(f"\nInterleaved latency, one caller ({args.latency_calls} steps per call, each "
              "step one call per leg, order rotating): p50, and added = median over the steps "
              "of (leg - direct in the same step)")
        for name, r in interleaved.items():
            cells = [f"{leg} p50 {fmt(r['p50_ms'].get(leg), '.3f')} ms"
                     + (f" (added {fmt(_us(r['added_ms'].get(leg)), '+.0f')} us)"
                        if leg in r["added_ms"] else "")
                     for leg in LEG_ORDER if leg in r["p50_ms"]]
            print(f"  {name:<13} " + ", ".join(cells)
                  + (f"; {r['errors']} errors" if r.get("errors") else ""))
    print()
    for name in CALLS:
        what = CALLS[name][2]
        d_cps = val("direct", name, "calls_per_s")
        d_p50 = val("direct", name, "p50_ms")
        g_cps, h_cps = val("gateway", name, "calls_per_s"), val("haproxy", name, "calls_per_s")
        g_add = diff(val("gateway", name, "p50_ms"), d_p50)
        h_add = diff(val("haproxy", name, "p50_ms"), d_p50)
        added_ratio = (fmt(ratio(g_add, h_add), ".1f") if h_add is None or h_add > 0
                       else "n/a: haproxy adds <= 0")
        print(
            f"SUMMARY {name} (gateway: {what}): calls/s direct {fmt(d_cps, '.0f')}, haproxy "
            f"{fmt(h_cps, '.0f')} ({fmt(ratio(h_cps, d_cps), '.2f')} x direct), gateway "
            f"{fmt(g_cps, '.0f')} ({fmt(ratio(g_cps, d_cps), '.2f')} x direct, "
            f"{fmt(ratio(g_cps, h_cps), '.2f')} x haproxy); added p50 gateway "
            f"{fmt(None if g_add is None else g_add * 1000, '+.0f')} us, haproxy "
            f"{fmt(None if h_add is None else h_add * 1000, '+.0f')} us "
            f"(gateway/haproxy {added_ratio})" + _interleaved_summary(interleaved.get(name))
        )
    ok = all(any(r for r in lg.runs) for lg in legs if lg.name in ("direct", "gateway"))
    return (0 if ok else 1), summary


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1000


def _interleaved_summary(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    g, h = r["added_ms"].get("gateway"), r["added_ms"].get("haproxy")
    ratio = (fmt(g / h, ".1f") if g is not None and h is not None and h > 0
             else "n/a" if h is not None and h <= 0 else "-")
    return (f"; interleaved: added p50 gateway {fmt(_us(g), '+.0f')} us, haproxy "
            f"{fmt(_us(h), '+.0f')} us (gateway/haproxy {ratio})")


# ----------------------------------------------------------------------------------------
# idle mode


class IdleConn(asyncio.Protocol):
    """An HTTP/2 client connection that opens no stream: preface, empty SETTINGS, the server's
    SETTINGS acknowledged (PINGs answered), then nothing."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.settings_seen: asyncio.Future[None] = loop.create_future()
        self.t: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.goaway: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        self.t.write(PREFACE + settings_frame([]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.t = None
        if not self.settings_seen.done():
            self.settings_seen.set_exception(UploadError(f"closed before SETTINGS ({exc})"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 9:
            flen = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + flen:
                break
            ftype, flags = buf[3], buf[4]
            payload = bytes(buf[9 : 9 + flen])
            del buf[: 9 + flen]
            if ftype == SETTINGS and not flags & ACK and self.t is not None:
                self.t.write(frame(SETTINGS, ACK, 0))
                if not self.settings_seen.done():
                    self.settings_seen.set_result(None)
            elif ftype == PING and not flags & ACK and self.t is not None:
                self.t.write(frame(PING, ACK, 0, payload))
            elif ftype == GOAWAY and len(payload) >= 8:
                self.goaway = (f"code {U32.unpack_from(payload, 4)[0]} "
                               f"{payload[8:].decode(errors='replace')!r}")

    def close(self) -> None:
        if self.t is not None:
            self.t.close()


class HeldBuild(UploadClient):
    """A build in flight, as buildctl opens it: `Control/Session` (session headers, including
    x-docker-expose-session-name) and `Control/Solve{Ref, Session}` on one connection. Nothing
    is uploaded: the Session stays open, so the sink keeps the Solve unanswered, until
    `end_session` half-closes it (then Solve and Session must both end with grpc-status 0)."""

    def _headers_frames(self, sid: int, hdrs: list[tuple[str, str]]) -> bytes:
        if sid == self.SESSION_SID:
            hdrs = [*hdrs, ("x-docker-expose-session-name", f"bench-calls-{self.session_id[:8]}")]
        return super()._headers_frames(sid, hdrs)

    def _pump(self) -> None:
        pass  # no upload

    def end_session(self) -> None:
        if self.t is not None and not self.done.done():
            self.t.write(frame(DATA, END_STREAM, self.SESSION_SID))


async def open_many(factory: Any, port: int, n: int, batch: int) -> tuple[list[Any], list[str]]:
    """n connections, `batch` at a time (the listener's backlog is ~100); each must see the
    server's SETTINGS. Returns (protocols, errors)."""
    loop = asyncio.get_running_loop()
    conns: list[Any] = []
    errors: list[str] = []

    async def one() -> None:
        try:
            async with asyncio.timeout(10):
                _, proto = await loop.create_connection(factory, "127.0.0.1", port)
                conns.append(proto)
                await proto.settings_seen
        except (OSError, TimeoutError, UploadError) as e:
            errors.append(repr(e))

    for i in range(0, n, batch):
        await asyncio.gather(*(one() for _ in range(min(batch, n - i))))
    return conns, errors


def raise_nofile(need: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return f"RLIMIT_NOFILE {soft} (enough for {need})"
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    note = f"RLIMIT_NOFILE raised {soft} -> {new}"
    return note if new >= need else note + f" (hard limit {hard} < {need} needed)"


async def idle_mode(args: argparse.Namespace, t_start: float) -> tuple[int, dict[str, Any]]:
    n_idle, n_builds = args.idle, args.inflight
    tmp = Path(tempfile.mkdtemp(prefix="bench-calls-idle-"))
    procs: list[Proc] = []
    idle: list[IdleConn] = []
    builds: list[HeldBuild] = []
    out: dict[str, Any] = {"idle": n_idle, "inflight": n_builds, "cycles": []}
    rc = 0
    # this process holds every client connection; the gateway (which inherits the limit) one
    # socket per client plus a few upstream connections
    out["nofile"] = raise_nofile(n_idle + n_builds + 512)
    print(out["nofile"], flush=True)
    limit = max(10000, n_idle + n_builds + 100)
    per_client = n_idle + n_builds + 100
    extra = ["--max-connections", str(limit), "--max-connections-per-client", str(per_client)]
    try:
        sink, sink_port = await start_sink(tmp)
        procs.append(sink)
        gw = Leg("gateway")
        admin = await launch_gateway(gw, args, tmp, sink_port, extra)
        if gw.proc:
            procs.append(gw.proc)
        if gw.skipped or gw.proc is None:
            print(f"gateway: SKIPPED: {gw.skipped}")
            return 1, {"skipped": gw.skipped}
        gpid = gw.proc.pid
        print(f"gateway: {gw.note}\ngateway code: {args.source}", flush=True)
        only = [RELAYED, CACHED]

        async def latencies(stage: str) -> dict[str, Any]:
            res: dict[str, Any] = {}
            for leg, port in (("direct", sink_port), ("gateway", gw.port)):
                try:
                    res[leg] = await run_worker(args, port, only, calls=0,
                                                latency_calls=args.latency_calls)
                except (UploadError, OSError) as e:
                    res[leg] = {"failed": str(e)}
                parts = [f"{n} p50 {fmt(r.get('p50_ms'), '.3f')} p99 {fmt(r.get('p99_ms'), '.3f')}"
                         + (f" ({r['errors']} errors: {r['error_examples'][:1]})"
                            if r.get("errors") else "")
                         for n, r in res[leg].items() if isinstance(r, dict)]
                print(f"  {stage:<10} {leg:<8} " + (", ".join(parts) or str(res[leg])),
                      flush=True)
            return res

        async def snapshot(stage: str) -> dict[str, Any]:
            await asyncio.sleep(0.5)  # let allocations settle
            snap: dict[str, Any] = {"stage": stage, "rss_kb": rss_kb(gpid)}
            try:
                snap.update(gateway_numbers(await api_status(admin)))
            except (OSError, TimeoutError, UploadError, ValueError) as e:
                snap["status_error"] = repr(e)
            print(f"  {stage:<10} gateway VmRSS {snap['rss_kb']['VmRSS'] / 1024:.1f} MiB "
                  f"(HWM {snap['rss_kb']['VmHWM'] / 1024:.1f}), clients {snap.get('clients')}, "
                  f"active builds {snap.get('active_builds')}, streams {snap.get('streams')}",
                  flush=True)
            return snap

        out["before"] = {**await snapshot("before"), "latency": await latencies("before")}
        payload = Payload(1, (1,))  # unused: a HeldBuild uploads nothing
        for cycle in range(1, args.cycles + 1):
            print(f" cycle {cycle}: {n_idle} idle connections, {n_builds} builds in flight",
                  flush=True)
            cyc: dict[str, Any] = {}
            out["cycles"].append(cyc)
            t0 = time.perf_counter()
            idle, errs = await open_many(IdleConn, gw.port, n_idle, args.connect_batch)
            open_s = time.perf_counter() - t0
            refused = [c.goaway for c in idle if c.goaway]
            print(f"  opened {len(idle) - len(errs)}/{n_idle} idle connections in {open_s:.1f} s"
                  + (f"; {len(errs)} failed, e.g. {errs[0]}" if errs else "")
                  + (f"; GOAWAY on {len(refused)}: {refused[0]}" if refused else ""), flush=True)
            cyc["idle_open"] = {"ok": len(idle) - len(errs), "failed": len(errs),
                                "examples": errs[:3], "goaway": refused[:3], "seconds": open_s}
            if errs:
                rc = 1
            cyc["idle"] = await snapshot("+idle")

            builds.clear()
            t0 = time.perf_counter()

            def make() -> HeldBuild:
                b = HeldBuild(payload, f"127.0.0.1:{gw.port}", random_id(), random_id())
                builds.append(b)
                return b

            started, berrs = await open_many(make, gw.port, n_builds, args.connect_batch)
            for b in started:
                seen = b.settings_seen
                if seen.done() and not seen.cancelled() and seen.exception() is None and b.t:
                    b.start()
            want = len(started) - len(berrs)
            deadline = time.monotonic() + 20 + n_builds * 0.05
            numbers: dict[str, Any] = {}
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError, TimeoutError, UploadError, ValueError):
                    numbers = gateway_numbers(await api_status(admin))
                    if numbers["active_builds"] >= want:
                        break
                if all(b.done.done() for b in builds):  # every one failed: no use waiting
                    break
                await asyncio.sleep(0.2)
            place_s = time.perf_counter() - t0
            failed_early = [b for b in builds if b.done.done()]
            print(f"  {numbers.get('active_builds')} of {n_builds} builds placed (gateway "
                  f"/api/status) in {place_s:.1f} s"
                  + (f"; {len(berrs)} connections failed, e.g. {berrs[0]}" if berrs else "")
                  + (f"; {len(failed_early)} ended early" if failed_early else ""), flush=True)
            cyc["builds_placed"] = {"active_builds": numbers.get("active_builds"),
                                    "connect_failed": len(berrs), "examples": berrs[:3],
                                    "ended_early": len(failed_early), "seconds": place_s}
            if numbers.get("active_builds") != n_builds:
                rc = 1
            cyc["loaded"] = await snapshot("+builds")
            cyc["loaded"]["latency"] = await latencies("loaded")

            # end everything: sessions half-closed -> Solves answered -> connections closed
            t0 = time.perf_counter()
            for b in builds:
                b.end_session()
            results = await asyncio.gather(
                *(asyncio.wait_for(asyncio.shield(b.done), 15) for b in builds),
                return_exceptions=True)
            bad = [repr(r) for r in results if isinstance(r, BaseException)]
            print(f"  ended {len(builds) - len(bad)}/{len(builds)} builds OK (Solve and Session "
                  f"grpc-status 0) in {time.perf_counter() - t0:.1f} s"
                  + (f"; {len(bad)} failed, e.g. {bad[0]}" if bad else ""), flush=True)
            cyc["builds_ended"] = {"ok": len(builds) - len(bad), "failed": len(bad),
                                   "examples": sorted(set(bad))[:3]}
            if bad:
                rc = 1
            dropped = [c for c in idle if c.closed]
            print(f"  idle connections closed by the gateway meanwhile: {len(dropped)}",
                  flush=True)
            cyc["idle_dropped"] = len(dropped)
            for b in builds:
                if b.t is not None:
                    b.t.close()
            for c in idle:
                c.close()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:  # wait for the gateway to see every close
                with contextlib.suppress(OSError, TimeoutError, UploadError, ValueError):
                    numbers = gateway_numbers(await api_status(admin))
                    if not numbers["clients"] and not numbers["active_builds"]:
                        break
                await asyncio.sleep(0.2)
            cyc["after"] = await snapshot("after")
        n_bad, examples = log_problems(gw.proc)
        out["gateway_log_problems"] = {"count": n_bad, "examples": examples}
        report_idle(args, out, n_bad, examples)
        return rc, out
    finally:
        for c in [*builds, *idle]:
            t = c.t
            if t is not None:
                t.abort()
        stop_all(procs)
        if args.keep_logs:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report_idle(args: argparse.Namespace, out: dict[str, Any], n_bad: int,
                examples: list[str]) -> None:
    n_idle, n_builds = args.idle, args.inflight
    rows: list[tuple[str, dict[str, Any]]] = [("before", out["before"])]
    for i, cyc in enumerate(out["cycles"], 1):
        rows += [(f"{i}: +idle", cyc.get("idle", {})), (f"{i}: +builds", cyc.get("loaded", {})),
                 (f"{i}: after", cyc.get("after", {}))]

    def rss(st: dict[str, Any] | None) -> float | None:
        return st["rss_kb"]["VmRSS"] / 1024 if st and "rss_kb" in st else None

    def lat(st: dict[str, Any] | None, leg: str, name: str, key: str) -> float | None:
        r = ((st or {}).get("latency") or {}).get(leg, {}).get(name)
        v = r.get(key) if isinstance(r, dict) else None
        return float(v) if v is not None else None

    print(f"\npython {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"Gateway with {n_idle} idle HTTP/2 connections and {n_builds} builds in flight "
          f"(a connection each: Session open, Solve waiting), {args.cycles} cycle(s) of opening "
          f"and closing them; latency: one caller, {args.latency_calls} sequential calls per "
          "measurement, a fresh client process each, through the gateway and direct to the sink")
    hdr = (f"{'stage':<11} {'VmRSS MiB':>9} {'clients':>7} {'builds':>6} | {RELAYED + ' ms':<25} "
           f"| {CACHED + ' ms':<25}")
    sub = (f"{'':<11} {'':>9} {'':>7} {'':>6} | {'gw p50':>7} {'gw p99':>7} {'dir p50':>8} "
           f"| {'gw p50':>7} {'gw p99':>7} {'dir p50':>8}")
    print(hdr)
    print(sub)
    print("-" * len(sub))
    for label, st in rows:
        cells = [f"{fmt(lat(st, 'gateway', n, 'p50_ms'), '.3f'):>7} "
                 f"{fmt(lat(st, 'gateway', n, 'p99_ms'), '.3f'):>7} "
                 f"{fmt(lat(st, 'direct', n, 'p50_ms'), '.3f'):>8}"
                 if st.get("latency") else f"{'':>24}" for n in (RELAYED, CACHED)]
        print(f"{label:<11} {fmt(rss(st), '.1f'):>9} {fmt(st.get('clients'), 'd'):>7} "
              f"{fmt(st.get('active_builds'), 'd'):>6} | {cells[0]} | {cells[1]}")
    print("(gateway ListWorkers is answered from its cache; Content/Info is relayed to the sink)")
    print(f"gateway log: {n_bad} warning/error line(s)"
          + "".join(f"\n    | {ln[:220]}" for ln in examples))
    print()
    before = out["before"]
    r0 = rss(before)
    if not out["cycles"]:
        return
    c1 = out["cycles"][0]
    r1, r2 = rss(c1.get("idle")), rss(c1.get("loaded"))
    if r0 is not None and r1 is not None:
        per = (r1 - r0) * 1024 / n_idle if n_idle else None
        print(f"SUMMARY idle: {n_idle} idle connections +{r1 - r0:.1f} MiB gateway RSS "
              f"({fmt(per, '.1f')} KiB each), {c1['idle_open']['failed']} refused or failed, "
              f"{c1.get('idle_dropped', '-')} dropped by the gateway")
    if r1 is not None and r2 is not None:
        per = (r2 - r1) * 1024 / n_builds if n_builds else None
        placed = c1.get("builds_placed", {}).get("active_builds")
        ended = c1.get("builds_ended", {})
        print(f"SUMMARY inflight: {n_builds} builds in flight ({placed} placed per /api/status) "
              f"+{r2 - r1:.1f} MiB gateway RSS ({fmt(per, '.1f')} KiB each); ended "
              f"{ended.get('ok', '-')} OK, {ended.get('failed', '-')} failed")
    afters = [rss(c.get("after")) for c in out["cycles"]]
    if r0 is not None and r2 is not None:
        print(f"SUMMARY rss: before {r0:.1f} MiB, loaded {r2:.1f} MiB, after everything closed "
              + ", ".join(f"(cycle {i}) {fmt(a, '.1f')} MiB" for i, a in enumerate(afters, 1))
              + (f"; cycle {len(afters)} vs cycle 1 after: {afters[-1] - afters[0]:+.1f} MiB"
                 if len(afters) > 1 and None not in (afters[0], afters[-1]) else ""))
    loaded = c1.get("loaded")
    for name in (RELAYED, CACHED):
        parts = []
        for label, st in (("before", before), ("loaded", loaded)):
            g, d = lat(st, "gateway", name, "p50_ms"), lat(st, "direct", name, "p50_ms")
            added = g - d if g is not None and d is not None else None
            parts.append(f"{label} p50 {fmt(g, '.3f')} ms (direct {fmt(d, '.3f')}, added "
                         f"{fmt(None if added is None else added * 1000, '+.0f')} us) p99 "
                         f"{fmt(lat(st, 'gateway', name, 'p99_ms'), '.3f')} ms")
        print(f"SUMMARY latency {name} gateway: " + "; ".join(parts))


# ----------------------------------------------------------------------------------------
# main


async def amain(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    args.source = await asyncio.to_thread(gateway_source, args)
    try:
        async with asyncio.timeout(args.time_limit):
            if args.idle or args.inflight:
                rc, result = await idle_mode(args, t_start)
                mode = "idle"
            else:
                rc, result = await calls_mode(args, t_start)
                mode = "calls"
    except TimeoutError:
        print(f"\nstopped after the --time-limit of {args.time_limit:.0f} s", file=sys.stderr)
        return 124
    except UploadError as e:
        print(f"bench/calls.py: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "mode": mode,
            "args": {k: v for k, v in vars(args).items() if k not in ("worker", "only")},
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "result": result,
        }, indent=2, default=str))
    return rc


async def interruptible(args: argparse.Namespace) -> int:
    """amain, cancelled on SIGTERM/SIGHUP (SIGINT: asyncio.run cancels it); the finally
    blocks stop every process started, and the worker processes are killed."""
    return await stoppable(amain(args), cleanup=_kill_workers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Unary calls: direct vs HAProxy tcp vs buildkit-gateway; or the gateway "
        "with many idle connections and builds in flight (--idle/--inflight)."
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    ap.add_argument("--calls", type=int, default=3000,
                    help="calls per throughput measurement (3000)")
    ap.add_argument("--latency-calls", type=int, default=None,
                    help="sequential calls per latency measurement (default min(--calls, 1000))")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up calls per call and client (default min(--calls // 4, 300))")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent callers (64)")
    ap.add_argument("--legs", default=",".join(LEG_ORDER),
                    help="comma list of direct,haproxy,gateway (default all)")
    ap.add_argument("--idle", type=int, default=0,
                    help="idle mode: this many idle HTTP/2 connections to the gateway")
    ap.add_argument("--inflight", type=int, default=0,
                    help="idle mode: this many builds in flight through the gateway")
    ap.add_argument("--cycles", type=int, default=2,
                    help="idle mode: open and close everything this many times (2): RSS after "
                    "each shows whether memory comes back or grows")
    ap.add_argument("--connect-batch", type=int, default=50,
                    help="idle mode: connections opened at once (50)")
    ap.add_argument("--gateway-cmd", default=None,
                    help="gateway command (shell words); --listen/--replica/--admin-listen are "
                    "appended. Default: buildkit-gateway next to this python, else on PATH")
    ap.add_argument("--haproxy", default=None, help="haproxy binary (default: PATH, /usr/sbin)")
    ap.add_argument("--call-timeout", type=float, default=10, help="deadline per call, s (10)")
    ap.add_argument("--worker-timeout", type=float, default=120,
                    help="limit per client process, s (120)")
    ap.add_argument("--ready-timeout", type=float, default=15,
                    help="time for the gateway to answer /readyz 200, s (15)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="no leg-round starts after this many s (default --time-limit - 60)")
    ap.add_argument("--time-limit", type=float, default=300,
                    help="the whole run is cancelled after this many s (300)")
    ap.add_argument("--json", default=None, help="also write results as JSON to this file")
    ap.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the logs")
    # the client process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--only", default=",".join(CALLS), help=argparse.SUPPRESS)
    ap.add_argument("--proxy-pid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sink-pid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ports", default="", help=argparse.SUPPRESS)  # leg=port,...: interleaved
    args = ap.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    if set(args.only) - set(CALLS):
        ap.error(f"unknown calls: {set(args.only) - set(CALLS)}")
    args.legs = [x.strip() for x in args.legs.split(",") if x.strip()]
    if set(args.legs) - set(LEG_ORDER):
        ap.error(f"unknown legs: {', '.join(sorted(set(args.legs) - set(LEG_ORDER)))}")
    if args.latency_calls is None:
        args.latency_calls = min(args.calls, 1000) if not args.worker else 0
    if args.warmup is None:
        args.warmup = min(args.calls // 4, 300) if not args.worker else 0
    if args.deadline is None:
        args.deadline = max(args.time_limit - 60, args.time_limit / 2)
    if min(args.rounds, args.calls, args.latency_calls, args.warmup, args.idle,
           args.inflight) < 0 or min(args.concurrency, args.connect_batch, args.cycles) < 1:
        ap.error("counts must not be negative (--concurrency, --connect-batch, --cycles: 1+)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return asyncio.run(interleaved_worker(args) if args.ports else worker(args))
    try:
        return asyncio.run(interruptible(args))
    except KeyboardInterrupt:
        print("\ninterrupted: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
