"""Operating the gateway: metrics against the fakes' records, probes, failures, status."""

from __future__ import annotations

import asyncio
import random
import sys

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import node_id
from tests.fakes.replica import JoinLimits
from tests.integration.clients import client, connect
from tests.integration.test_admission import QueueWatch

SOLVE = "/moby.buildkit.v1.Control/Solve"


def admin_url(gw: Gateway) -> str:
    assert gw.admin is not None
    return f"http://127.0.0.1:{gw.admin.port}"


async def scrape(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(admin_url(gw) + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == want for k, want in labels.items()))


async def test_metrics_after_a_run_of_builds_match_the_fakes_records() -> None:
    # The failing build (a session nobody opens) fails after the session limit: keep that one
    # short; the others are the daemon's own, so a loaded machine does not fail good builds.
    limits = JoinLimits(session=1.0)
    async with running_replicas(3, limits=limits) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        port = gateway_port(gw)
        conns = [await connect("grpc-go" if i % 2 else "grpcio", port) for i in range(6)]
        try:
            outs = await asyncio.gather(*(
                buildflow.buildx_session(t, context_dir=f"/src/m{i}", node_id=node_id(),
                                         builds=2, upload=50_000, rng=random.Random(i))
                for i, t in enumerate(conns)))
            failing = await buildflow.build(conns[0], context_dir="/src/m0", node_id="x",
                                            shared_sessions={"context": "no-such-session"})
        finally:
            for t in conns:
                await t.close()
        samples = await scrape(gw)

    assert all(o.ok for o in outs), [(o.error, o.probe and o.probe.error,
                                      [b.error for b in o.builds]) for o in outs]
    assert not failing.ok and "no active session" in (failing.error or "")
    solves = {r.address: r.calls(SOLVE) for r in replicas}  # the gateway's replica ids
    for name, records in solves.items():
        real = [c for c in records if not c.internal]
        probes = [c for c in records if c.internal]
        assert total(samples, "buildkit_gateway_builds_started_total", replica=name,
                     internal="false") == len(real)
        assert total(samples, "buildkit_gateway_builds_started_total", replica=name,
                     internal="true") == len(probes)
        assert total(samples, "buildkit_gateway_builds_finished_total", replica=name,
                     internal="false", result="ok") == sum(c.outcome == "ok" for c in real)
    assert total(samples, "buildkit_gateway_builds_finished_total",
                 result="deadline_exceeded") == 1
    assert total(samples, "buildkit_gateway_build_duration_seconds_count") == 13
    assert total(samples, "buildkit_gateway_placements_total") == 13  # probes apart
    assert total(samples, "buildkit_gateway_placements_total", outcome="bound") == 7
    assert total(samples, "buildkit_gateway_client_connections_accepted_total") == 6
    assert total(samples, "buildkit_gateway_streams_opened_total", **{"class": "solve"}) == 19
    assert total(samples, "buildkit_gateway_relayed_bytes_total",
                 direction="upstream") > 12 * 50_000
    assert total(samples, "buildkit_gateway_builds_active") == 0
    assert total(samples, "buildkit_gateway_replica_up") == 3
    assert total(samples, "buildkit_gateway_replicas", state="ready") == 3
    info = [lab for (n, lab) in samples if n == "buildkit_gateway_build_info"]
    assert info and dict(info[0])["version"]


async def test_probes_answer_for_the_gateway_and_its_replicas() -> None:
    async with running_replicas(1) as replicas, running_gateway(
            [r.address for r in replicas]) as gw, aiohttp.ClientSession() as http:
        url = admin_url(gw)
        async with http.get(url + "/healthz") as r:
            assert r.status == 200
        async with http.get(url + "/readyz") as r:
            assert r.status == 200
        changed = asyncio.Event()
        gw.registry.subscribe(lambda _snap: changed.set())
        await replicas[0].stop(grace=0)
        async with asyncio.timeout(10):  # the next probe (0.5 s) marks it not ready
            while gw.registry.snapshot.replicas[0].ready:
                changed.clear()
                await changed.wait()
        async with http.get(url + "/readyz") as r:
            assert r.status == 503
            assert "no ready replica" in await r.text()
        async with http.get(url + "/healthz") as r:
            assert r.status == 200  # alive all the same


async def _replica_process(name: str, delay: float) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.replica_main", "--name", name,
        "--solve-delay", str(delay), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        line = (await proc.stdout.readline()).decode()
    assert line.startswith("READY "), line
    return proc, line.split()[1]


async def test_a_replica_killed_mid_build_fails_its_builds_within_2s_others_finish() -> None:
    procs = [await _replica_process(f"k{i}", 3.0) for i in range(3)]
    try:
        async with running_gateway([address for _p, address in procs]) as gw:
            port = gateway_port(gw)
            conns = [await connect("grpc-go", port) for _ in range(9)]
            watch = QueueWatch(gw)
            try:
                tasks = [asyncio.create_task(buildflow.build(
                    t, context_dir=f"/src/f{i}", node_id=node_id(), rng=random.Random(i)))
                    for i, t in enumerate(conns)]
                await watch.until(lambda: len(watch.admitted) == 9)
                loads = dict(gw.ledger.loads())
                victim_proc, victim = next((p, a) for p, a in procs if loads.get(a))
                loop = asyncio.get_running_loop()
                victim_proc.kill()  # a crash: no goodbye on the wire
                killed_at = loop.time()
                ended: dict[str, float] = {}
                for next_done in asyncio.as_completed(tasks):
                    out = await next_done
                    ended[out.ref] = loop.time()
                outs = [t.result() for t in tasks]
            finally:
                for t in conns:
                    await t.close()
            snapshot = gw.registry.snapshot
    finally:
        for proc, _address in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    lost = [o for o in outs if not o.ok]
    assert len(lost) == loads[victim]
    for o in lost:
        assert o.error_code == 14, o.error
        # lost under a call in flight, or unreachable for a call of the build opened after
        # the kill (a loaded machine delays some): either names the replica
        assert (f"connection to BuildKit replica {victim} lost" in (o.error or "")
                or (f"BuildKit replica {victim} (" in (o.error or "")
                    and "is unreachable" in (o.error or ""))), o.error
        assert ended[o.ref] - killed_at < 2.0
    assert all(o.ok for o in outs if o not in lost)
    assert not snapshot.by_id[victim].placeable  # ejected: no new builds there


async def test_status_subcommand_prints_the_table() -> None:
    async with running_replicas(2) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        async with client("grpc-go", gateway_port(gw)) as t:
            out = await buildflow.build(t, context_dir="/src/s", node_id=node_id())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "status", "--admin", admin_url(gw),
            stdout=asyncio.subprocess.PIPE)
        async with asyncio.timeout(20):
            stdout, _ = await proc.communicate()
    text = stdout.decode()
    assert proc.returncode == 0, text
    assert "pool default (sticky, unlimited slots per replica, 0 waiting)" in text
    for r in replicas:
        assert f"{r.address}  ready" in text
    assert out.ref in text and "ok" in text
