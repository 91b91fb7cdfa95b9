"""How fast the autoscaler reacts to a queue, against a real kube-apiserver.

Each run is a fresh pool of the integration tests' harness (tests/integration/
test_kube_scaling.py `kube_pool`): a new namespace in the real kube-apiserver of
tests/fakes/kube.py, a `buildkitd` Deployment driven by its TestController (ReplicaSet
controller + kubelets, fake BuildKit replicas on 127.0.0.N), and an in-process gateway with
`--min-replicas 0 --max-replicas 3 --target-builds 1 --max-builds 1 --scale-down-window 0.5s`
that reaches the API as the RBAC-limited user `gateway`. A run:

1. warm-up: one build at zero, so the pool has cached answers (ListWorkers, Info, the LLBBridge
   Pong); then the pool goes back to 0 after the window (waited on the controller);
2. at zero (0 -> 1): a long build; its Solve queues, the scaler raises the count;
3. at one busy replica (1 -> 2): with that build running, a second build; it queues, the
   scaler raises the count again; then the long build is cancelled.

Timestamps are loop.time() in the one process: the queue forms when the hub's `enqueue` is
called with the build's Solve; the scale update is the scaler's own
`patch_namespaced_deployment_scale`, wrapped on its API object to take the time just before
the call and when it returns. The baseline, in the same run and process: 20 calls of
`read_namespaced_deployment_scale` through the gateway's own API client, the call the scaler
makes before deciding.

    .venv/bin/python bench/scaling.py [--runs 9] [--json FILE]

Exit status: 0 done, 1 a run failed, 2 no kube-apiserver (hack/kube/build.sh builds one; the
env BUILDKIT_GATEWAY_TEST_KUBE reuses a running one, as the tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # start_or_reuse() reports a missing apiserver with pytest's skip/fail

from tests.fakes import buildflow, kube
from tests.fakes.ids import new_id, node_id
from tests.fakes.replica import BUILD_SECONDS
from tests.fakes.transport import Transport
from tests.integration.clients import connect
from tests.integration.test_kube_scaling import Pool, kube_pool, scaling

WINDOW = "0.5s"  # scale-down window: the warm-up's pod goes quickly
BASELINE_CALLS = 20
LONG_BUILD = 60.0  # seconds: the build at zero holds its replica until it is cancelled
STEP_TIMEOUT = 20.0  # any one wait of a run
RUN_TIMEOUT = 40.0  # one whole run


class Probe:
    """Timestamps from inside the gateway: queued Solves, the scaler's API calls and passes."""

    def __init__(self, pool: Pool) -> None:
        self.loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()
        self.enqueued: list[tuple[float, str]] = []  # (time, ref) of each queued Solve
        self.reads: list[tuple[float, float]] = []  # the scaler's scale reads (sent, returned)
        self.patches: list[tuple[float, float, int]] = []  # (sent, returned, replicas)
        self.reconciles: list[float] = []  # start of each pass of the scaler
        self.reconciling = 0
        hub = pool.gw.hub
        assert hub is not None
        self.scaler = scaler = pool.gw.scalers["default"]
        apps = scaler._apps
        self.read_scale = apps.read_namespaced_deployment_scale  # the unwrapped one: baseline
        enqueue, read, patch, reconcile = (hub.enqueue, apps.read_namespaced_deployment_scale,
                                           apps.patch_namespaced_deployment_scale,
                                           scaler._reconcile)

        def on_enqueue(pool_name, waiter):  # type: ignore[no-untyped-def]
            now = self.loop.time()  # before the hub pokes the scaler
            refused = enqueue(pool_name, waiter)
            if refused is None and not waiter.internal:  # only a Control/Solve is ever queued
                self.enqueued.append((now, waiter.ref))
            self.changed.set()
            return refused

        async def on_read(*args: Any, **kwargs: Any) -> Any:
            sent = self.loop.time()
            result = await read(*args, **kwargs)
            self.reads.append((sent, self.loop.time()))
            return result

        async def on_patch(*args: Any, **kwargs: Any) -> Any:
            sent = self.loop.time()
            result = await patch(*args, **kwargs)
            body = args[2] if len(args) > 2 else kwargs["body"]
            self.patches.append((sent, self.loop.time(), int(body["spec"]["replicas"])))
            self.changed.set()
            return result

        async def on_reconcile() -> None:
            self.reconciles.append(self.loop.time())
            self.reconciling += 1
            try:
                await reconcile()
            finally:
                self.reconciling -= 1
                self.changed.set()

        hub.enqueue = on_enqueue  # type: ignore[method-assign]
        apps.read_namespaced_deployment_scale = on_read  # type: ignore[method-assign]
        apps.patch_namespaced_deployment_scale = on_patch  # type: ignore[method-assign]
        scaler._reconcile = on_reconcile  # type: ignore[method-assign]

    @property
    def idle(self) -> bool:
        """The scaler has no pass under way and none pending."""
        return self.reconciling == 0 and not self.scaler.wake.is_set()


async def until(pool: Pool, probe: Probe, predicate: Callable[[], bool], what: str,
                timeout: float = STEP_TIMEOUT) -> None:
    """Wait for gateway, cluster or probe state; re-checked on every change of any of them."""
    try:
        await pool.wait(predicate, timeout, probe.changed)
    except TimeoutError as exc:
        scaler, gw = probe.scaler, pool.gw
        raise TimeoutError(
            f"{what}: not within {timeout}s; scaler: passes under way {probe.reconciling}, "
            f"woken {scaler.wake.is_set()}, count {scaler.current}, events {scaler.events}; "
            f"API error {gw.kube.health.error if gw.kube else ''!r}; replicas "
            f"{[r.id for r in gw.registry.snapshot.replicas]}; builds "
            f"{[(r.ref, r.replica) for r in gw.ledger.active()]}; controller "
            f"{pool.controller.describe()}") from exc


async def start_build(pool: Pool, i: int, *, seconds: float = 0.0
                      ) -> tuple[str, Transport, asyncio.Task[buildflow.BuildOutcome]]:
    ref = new_id()
    t = await connect("grpc-go", pool.port)
    task = asyncio.create_task(buildflow.build(
        t, context_dir=f"/src/p{i}", node_id=node_id(), rng=random.Random(i), ref=ref,
        timeout=STEP_TIMEOUT, frontend_attrs={BUILD_SECONDS: str(seconds)} if seconds else {}))
    return ref, t, task


@dataclass
class Scale:
    """One queue-triggered scale-up, in seconds from the Solve being queued."""

    direction: str  # "0->1", "1->2"
    to_wake: float  # the scaler's pass starts
    to_read_sent: float  # it sends its read of the scale subresource
    read_rtt: float  # that read's round trip
    to_patch_sent: float  # the scale update is sent
    patch_rtt: float  # its round trip
    to_patch_returned: float  # and it has returned (the scaler's event time)
    to_placed: float  # the build is dispatched to the new pod
    ready_to_placed: float  # from the new pod's Ready status write to the dispatch


@dataclass
class Run:
    rtt: float  # median of BASELINE_CALLS reads of the scale subresource (same client)
    rtts: list[float]
    at_zero: Scale
    at_one: Scale
    setup: float  # seconds: namespace, RBAC, controller, gateway
    warm: float  # seconds: warm-up build and the way back to 0
    total: float


def placed_at(pool: Pool, ref: str) -> tuple[float, str] | None:
    recs = [*pool.gw.ledger.active(), *pool.gw.ledger.finished()]
    rec = next((r for r in recs if r.ref == ref and r.replica), None)
    return None if rec is None else (rec.started, rec.replica)


async def measure_scale(pool: Pool, probe: Probe, ref: str, direction: str,
                        target: int) -> Scale:
    """After a Solve `ref` was started at a settled pool: the scale-up it causes, and its
    dispatch to the pod that scale-up starts."""
    await until(pool, probe, lambda: any(r == ref for _t, r in probe.enqueued),
                f"{direction}: Solve queued")
    queued = next(t for t, r in probe.enqueued if r == ref)
    await until(pool, probe, lambda: any(p[0] >= queued for p in probe.patches),
                f"{direction}: scale update sent")
    sent, returned, replicas = next(p for p in probe.patches if p[0] >= queued)
    if replicas != target:
        raise RuntimeError(f"{direction}: scaled to {replicas}, expected {target}")
    wake = next(t for t in probe.reconciles if t >= queued)
    read_sent, read_returned = next(r for r in probe.reads if r[0] >= wake)
    event = next(e for e in probe.scaler.events if e[0] >= returned)
    if event[1:] != ("up", target - 1, target):
        raise RuntimeError(f"{direction}: scaler event {event}")
    await until(pool, probe, lambda: placed_at(pool, ref) is not None,
                f"{direction}: build dispatched")
    placed, pod = placed_at(pool, ref)  # type: ignore[misc]
    ready = pool.controller.ready_at.get(pod)
    if ready is None or ready < sent:
        raise RuntimeError(f"{direction}: dispatched to {pod}, not to the pod started for it "
                           f"(Ready at {ready}, scale update sent at {sent})")
    return Scale(direction, wake - queued, read_sent - queued, read_returned - read_sent,
                 sent - queued, returned - sent, returned - queued, placed - queued,
                 placed - ready)


async def one_run(cluster: kube.KubeCluster) -> Run:
    loop = asyncio.get_running_loop()
    begin = loop.time()
    async with kube_pool(cluster, *scaling(window=WINDOW)) as pool:
        probe = Probe(pool)
        controller, registry = pool.controller, pool.gw.registry
        setup = loop.time() - begin
        transports: list[Transport] = []
        tasks: list[asyncio.Task[Any]] = []
        try:
            # 1. warm-up at zero: the pool gets its cached answers; then back to 0
            _ref, t, task = await start_build(pool, 0)
            transports.append(t)
            async with asyncio.timeout(STEP_TIMEOUT):
                out = await task
            if not out.ok:
                raise RuntimeError(f"warm-up build failed: {out.error}")
            await controller.wait_for(lambda c: c.spec_replicas == 0 and not c.pods,
                                      STEP_TIMEOUT)
            await until(pool, probe, lambda: probe.idle and probe.scaler.current == 0
                        and not registry.snapshot.replicas and not any(pool.gw.ledger.active()),
                        "settled at zero")
            warm = loop.time() - begin - setup
            control, hub = pool.gw.control, pool.gw.hub
            if (control is None or hub is None or "default" not in control.cache.last_of_pool
                    or hub.pools["default"].pong is None):
                raise RuntimeError("the pool at zero has no cached answers")

            # baseline: the scaler's read, through the gateway's client, at rest
            rtts: list[float] = []
            for _ in range(BASELINE_CALLS):
                start = time.perf_counter()
                async with asyncio.timeout(STEP_TIMEOUT):
                    await probe.read_scale(probe.scaler.workload.deployment,
                                           probe.scaler.namespace)
                rtts.append(time.perf_counter() - start)

            # 2. at zero: a long build queues, 0 -> 1
            ref, t, task = await start_build(pool, 1, seconds=LONG_BUILD)
            transports.append(t)
            tasks.append(task)
            at_zero = await measure_scale(pool, probe, ref, "0->1", 1)
            await until(pool, probe, lambda: probe.idle and probe.scaler.current == 1
                        and sum(r.serving for r in registry.snapshot.replicas) == 1,
                        "settled at one busy replica")

            # 3. at one busy replica: a second build queues, 1 -> 2
            ref, t, task = await start_build(pool, 2)
            transports.append(t)
            at_one = await measure_scale(pool, probe, ref, "1->2", 2)
            async with asyncio.timeout(STEP_TIMEOUT):
                out = await task
            if not out.ok:
                raise RuntimeError(f"the build at one busy replica failed: {out.error}")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for t in transports:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await t.close()
    return Run(statistics.median(rtts), rtts, at_zero, at_one, setup, warm,
               loop.time() - begin)


# ---------------------------------------------------------------------------------- report

def ms(values: list[float]) -> str:
    return (f"{statistics.median(values) * 1e3:8.1f} {min(values) * 1e3:8.1f} "
            f"{max(values) * 1e3:8.1f}")


def report(runs: list[Run]) -> None:
    rtt = [r.rtt for r in runs]
    rows: list[tuple[str, list[float]]] = [
        ("API round trip: read scale (baseline, median of 20)", rtt),
    ]
    for key, title in (("at_zero", "at zero, 0->1"), ("at_one", "at 1 busy replica, 1->2")):
        scales: list[Scale] = [getattr(r, key) for r in runs]
        rows += [
            (f"{title}: queue -> scale update sent", [s.to_patch_sent for s in scales]),
            (f"{title}: queue -> scale update returned", [s.to_patch_returned for s in scales]),
            ("    queue -> scaler pass starts", [s.to_wake for s in scales]),
            ("    its read of the scale (round trip)", [s.read_rtt for s in scales]),
            ("    read returned -> update sent (decide)",
             [s.to_patch_sent - s.to_read_sent - s.read_rtt for s in scales]),
            ("    the update (PATCH round trip)", [s.patch_rtt for s in scales]),
            (f"{title}: queue -> build dispatched", [s.to_placed for s in scales]),
            (f"{title}: pod Ready -> build dispatched", [s.ready_to_placed for s in scales]),
        ]
    width = max(len(name) for name, _ in rows)
    print(f"\nscale-up latency, {len(runs)} run(s) against a real kube-apiserver "
          "(ms; median, min, max over runs)")
    print(f"{'':{width}s}   median      min      max")
    for name, values in rows:
        print(f"{name:{width}s} {ms(values)}")
    base = statistics.median(rtt)
    print("\nin API round trips (median over runs / median baseline read "
          f"{base * 1e3:.1f} ms):")
    for key, title in (("at_zero", "at zero, 0->1"), ("at_one", "at 1 busy, 1->2")):
        scales = [getattr(r, key) for r in runs]
        per_run_sent = [s.to_patch_sent / r.rtt for s, r in zip(scales, runs, strict=True)]
        print(f"  {title}: queue -> update sent "
              f"{statistics.median(s.to_patch_sent for s in scales) / base:.1f} round trips, "
              f"-> update returned "
              f"{statistics.median(s.to_patch_returned for s in scales) / base:.1f} "
              f"(per-run ratio of sent: median {statistics.median(per_run_sent):.1f}, "
              f"{min(per_run_sent):.1f} .. {max(per_run_sent):.1f})")
    print(f"\nrun time: median {statistics.median(r.total for r in runs):.2f} s "
          f"(set-up {statistics.median(r.setup for r in runs):.2f} s, warm-up and back to 0 "
          f"{statistics.median(r.warm for r in runs):.2f} s)")


async def amain(args: argparse.Namespace, cluster: kube.KubeCluster) -> list[Run]:
    runs: list[Run] = []
    for i in range(args.runs):
        async with asyncio.timeout(RUN_TIMEOUT):
            run = await one_run(cluster)
        runs.append(run)
        print(f"run {i + 1}/{args.runs}: 0->1 update sent {run.at_zero.to_patch_sent * 1e3:.1f}"
              f" ms, returned {run.at_zero.to_patch_returned * 1e3:.1f} ms; Ready -> dispatched "
              f"{run.at_zero.ready_to_placed * 1e3:.1f} ms; 1->2 update sent "
              f"{run.at_one.to_patch_sent * 1e3:.1f} ms, returned "
              f"{run.at_one.to_patch_returned * 1e3:.1f} ms; read RTT {run.rtt * 1e3:.1f} ms "
              f"({run.total:.2f} s)", flush=True)
    return runs


class _Expected(logging.Filter):
    """Drops the start-up warning every run's gateway gives: it has only Kubernetes pods."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("no replicas configured")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=9, help="repeated runs (default 9)")
    ap.add_argument("--json", type=Path, help="also write every run as JSON")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    logging.getLogger("gateway").addFilter(_Expected())
    started = time.monotonic()
    try:
        cluster = kube.start_or_reuse()
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        print(f"bench/scaling.py: no kube-apiserver: {exc.msg}", file=sys.stderr)
        return 2
    try:
        print(f"kube-apiserver on 127.0.0.1:{cluster.port} "
              f"({'started for this run' if cluster.owned else 'reused'}, "
              f"{time.monotonic() - started:.1f} s)", flush=True)
        try:
            runs = asyncio.run(amain(args, cluster))
        except Exception as exc:
            print(f"bench/scaling.py: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        report(runs)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
        print(f"total {time.monotonic() - started:.1f} s")
        return 0
    finally:
        kube.stop(cluster)


if __name__ == "__main__":
    sys.exit(main())
