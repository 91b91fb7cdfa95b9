"""The routing contract end to end: gateway + 3 fake replicas + fake clients of both styles.

The fake replicas fail like buildkitd when calls of one build are split (no active session,
no such job), so every assertion on `ok` is also an assertion that nothing was misrouted; the
fakes' records then show where each call went.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import pytest

from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import node_id
from tests.fakes.replica import FakeReplica
from tests.integration.clients import STYLES, client, connect


def replicas_of(replicas: list[FakeReplica], *, ref: str, sessions: set[str]) -> set[str]:
    """Every replica that saw a call of the build (by Ref, buildid or session id)."""
    return {
        rec.replica
        for rep in replicas
        for rec in rep.records
        if (ref and rec.ref == ref) or (rec.session and rec.session in sessions)
    }


@pytest.mark.parametrize("style", STYLES)
async def test_200_builds_over_20_connections_each_whole_on_one_replica(style: str) -> None:
    rng = random.Random(7)
    async with running_replicas(3) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        port = gateway_port(gw)

        async def one_connection(i: int) -> tuple[str, list[buildflow.BuildOutcome],
                                                  buildflow.BuildOutcome | None, set[str]]:
            t = await connect(style, port)
            ctx = f"/ci/repo-{i % 7}"
            shared: set[str] = set()
            builds: list[buildflow.BuildOutcome] = []
            try:
                if i % 4 == 3:  # bake: a shared session and concurrent targets
                    boot = await buildflow.probe(t, rng=random.Random(rng.random()))
                    bake = await buildflow.bake(t, context_dir=ctx, node_id=node_id(),
                                                targets=5, upload=20_000,
                                                rng=random.Random(rng.random()))
                    assert bake.ok, bake.error or [b.error for b in bake.builds if not b.ok]
                    shared.add(bake.shared_session)
                    builds += bake.builds
                    bake2 = await buildflow.bake(t, context_dir=ctx, node_id=node_id(),
                                                 targets=5, rng=random.Random(rng.random()))
                    assert bake2.ok, bake2.error
                    shared.add(bake2.shared_session)
                    builds += bake2.builds
                    probe = boot
                else:  # buildx: boot, probe, sequential builds
                    out = await buildflow.buildx_session(
                        t, context_dir=ctx, node_id=node_id(), builds=10, upload=10_000,
                        rng=random.Random(rng.random()))
                    assert out.ok, out.error or [b.error for b in out.builds if not b.ok]
                    builds += out.builds
                    probe = out.probe
            finally:
                await t.close()
            return ctx, builds, probe, shared

        results = await asyncio.gather(*(one_connection(i) for i in range(20)))

    total = sum(len(b) for _c, b, _p, _s in results)
    assert total == 200
    probes_elsewhere = 0
    for _ctx, builds, probe, shared in results:
        conn_replicas: set[str] = set()
        for b in builds:
            assert b.ok, b.error
            where = replicas_of(replicas, ref=b.ref, sessions={b.session})
            assert where == {b.replica}, f"build {b.ref} split over {where}"
            conn_replicas |= where
        for s in shared:
            conn_replicas |= replicas_of(replicas, ref="", sessions={s})
        assert len(conn_replicas) == 1, f"a bound connection reached {conn_replicas}"
        assert probe is not None and probe.ok
        probe_where = replicas_of(replicas, ref=probe.ref, sessions={probe.session})
        assert len(probe_where) == 1
        if probe_where != conn_replicas:
            probes_elsewhere += 1
    # Probes are placed at random without binding: with 20 connections some of them must
    # have landed on a replica other than the one their connection was then bound to.
    assert probes_elsewhere > 0
    # And the builds are spread over the pool.
    used = {b.replica for _c, builds, _p, _s in results for b in builds}
    assert used == {"r0", "r1", "r2"}


@pytest.mark.parametrize("style", STYLES)
async def test_sticky_same_context_from_fresh_connections_lands_on_one_replica(
        style: str) -> None:
    async with running_replicas(3) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        port = gateway_port(gw)
        landed = set()
        for _ in range(20):  # fresh CI runners: new connection, new node id each time
            async with client(style, port) as t:
                out = await buildflow.buildx_session(t, context_dir="/ci/runner/work/myapp",
                                                     node_id=node_id())
            assert out.ok, out.error
            landed.add(out.builds[0].replica)
        assert len(landed) == 1

        per_dir = {}
        for i in range(30):
            async with client(style, port) as t:
                out = await buildflow.buildx_session(t, context_dir=f"/src/project-{i}",
                                                     node_id=node_id())
            assert out.ok, out.error
            per_dir[i] = out.builds[0].replica
        assert set(per_dir.values()) == {"r0", "r1", "r2"}


async def test_random_policy_spreads_builds_over_all_replicas() -> None:
    async with running_replicas(3) as replicas, running_gateway(
            [r.address for r in replicas], "--loadbalance", "random") as gw:
        port = gateway_port(gw)
        counts: dict[str, int] = defaultdict(int)
        for _ in range(30):
            async with client("grpcio", port) as t:
                out = await buildflow.buildctl(t, context_dir="/src/same")
            assert out.ok, out.error
            counts[out.replica] += 1
        assert set(counts) == {"r0", "r1", "r2"}


async def test_bounded_loads_spill_a_hot_key_to_ring_neighbours() -> None:
    async with running_replicas(3) as replicas, running_gateway(
            [r.address for r in replicas]) as gw:
        port = gateway_port(gw)
        conns = [await connect("grpcio", port) for _ in range(9)]
        try:
            # 9 concurrent builds of one context: bounded loads (c=1.25) allow at most
            # ceil(1.25 * 9 / 3) = 4 on any replica at once.
            for r in replicas:
                r.solve_delay = 1.0
            outs = await asyncio.gather(*(
                buildflow.build(t, context_dir="/src/hot", node_id=node_id()) for t in conns))
        finally:
            for t in conns:
                await t.close()
        assert all(o.ok for o in outs), [o.error for o in outs]
        per: dict[str, int] = defaultdict(int)
        for o in outs:
            per[o.replica] += 1
        assert max(per.values()) <= 4
        assert len(per) >= 3
