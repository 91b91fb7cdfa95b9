"""A StatefulSet pool (`--kube-statefulset`), against a real kube-apiserver.

The test controller plays the StatefulSet controller (Parallel pod management): it removes the
highest ordinals whatever they run. So the gateway must drain those first and lower the count
only once they are idle; and since pod names are stable, keys go back to the pods that hold
their caches after the pool grows again.
"""

from __future__ import annotations

import asyncio

import yaml

from gateway.routing.ring import HashRing
from tests.conftest import running_gateway
from tests.fakes import kube
from tests.integration.test_kube_gateways import pool_of, shared_cluster
from tests.integration.test_kube_scaling import DEPLOYMENT, build, rbac

NAMES = [f"{DEPLOYMENT}-{i}" for i in range(3)]


def statefulset_rbac() -> str:
    """deploy/'s RBAC with the StatefulSet's scale instead of the Deployment's (as the
    statefulset overlay of deploy/ has it)."""
    docs = list(yaml.safe_load_all(rbac()))
    for doc in docs:
        if doc["kind"] == "Role":
            for rule in doc["rules"]:
                if rule["resources"] == ["deployments/scale"]:
                    rule["resources"] = ["statefulsets/scale"]
                    rule["resourceNames"] = [DEPLOYMENT]
    return yaml.safe_dump_all(docs)


def key_on(pod: str, ring: HashRing, skip: int = 0) -> int:
    """A build number whose key (ctx:p<i>: the directory name) the ring puts on `pod`."""
    found = (i for i in range(1000) if ring.lookup(f"ctx:p{i}") == pod)
    for _ in range(skip):
        next(found)
    return next(found)


def args(c_namespace: str, kubeconfig: str, *, min_replicas: int) -> list[str]:
    return ["--kubeconfig", kubeconfig, "--kube-context", "gateway",
            "--kube-namespace", c_namespace, "--kube-statefulset", DEPLOYMENT,
            "--kube-port", "buildkitd", "--max-builds", "1", "--target-builds", "1",
            "--min-replicas", str(min_replicas), "--max-replicas", "3",
            "--scale-down-window", "1s", "--kube-lease-duration", "3s"]


async def test_scale_down_drains_the_highest_ordinals_and_keys_return_after_scale_up(
        kube_cluster: kube.KubeCluster) -> None:
    ring = HashRing(NAMES)
    keys = [key_on(pod, ring, skip) for pod in NAMES for skip in range(3)]  # 3 keys per pod
    async with shared_cluster(kube_cluster, replicas=3, kind="StatefulSet",
                              roles=statefulset_rbac()) as c:
        kubeconfig = str(c.cluster.kubeconfig)

        async def build_keys(*, min_replicas: int) -> dict[int, str]:
            """Every key once, through a gateway that keeps at least `min_replicas`."""
            async with running_gateway([], *args(c.namespace, kubeconfig,
                                                 min_replicas=min_replicas)) as gw:
                pool = pool_of(c, gw)
                await pool.until(lambda: sorted(gw.registry.snapshot.placeable()) == NAMES)
                placed: dict[int, str] = {}
                for i in keys:
                    out = await build(pool, i)
                    assert out.ok, out.error
                    placed[i] = out.replica
                return placed

        first = await build_keys(min_replicas=3)
        assert all(first[i] == ring.lookup(f"ctx:p{i}") for i in keys)
        # A gateway allowed to go down to 1 (after a 1 s window): a build on ordinal 2, a
        # longer one on ordinal 1; demand then falls to 2, then 1.
        async with running_gateway([], *args(c.namespace, kubeconfig, min_replicas=1)) as gw:
            pool = pool_of(c, gw)
            scaler = gw.scalers["default"]
            await pool.until(lambda: sorted(gw.registry.snapshot.placeable()) == NAMES)
            on_2 = asyncio.create_task(build(pool, key_on(NAMES[2], ring), seconds=2.5))
            on_1 = asyncio.create_task(build(pool, key_on(NAMES[1], ring), seconds=5))
            # Ordinal 2 drains (takes no new build) while it is busy; the count stays at 3.
            await pool.until(lambda: NAMES[2] in scaler.victims)
            assert c.controller.spec_replicas == 3 and not on_2.done()
            assert NAMES[2] not in gw.registry.snapshot.placeable()
            out = await on_2
            assert out.ok, out.error
            await c.controller.wait_for(lambda ctl: ctl.spec_replicas == 2, 10)
            # Then ordinal 1, once its build is done; the count never passes a busy pod.
            await pool.until(lambda: NAMES[1] in scaler.victims)
            assert c.controller.spec_replicas == 2 and not on_1.done()
            out = await on_1
            assert out.ok, out.error  # a pod removed while busy would have failed it
            await c.controller.wait_for(lambda ctl: ctl.spec_replicas == 1, 10)
            await c.controller.wait_for(
                lambda ctl: [p.name for p in ctl.active()] == NAMES[:1], 10)
            assert c.controller.deleted == [NAMES[2], NAMES[1]]
            print(f"\nscale 3 -> 1: {c.controller.deleted} drained, then removed; counts "
                  f"{[(e[2], e[3]) for e in scaler.events]}")
        old_ips = dict(c.controller.ips)
        # The pool grows back to 3 (a gateway with --min-replicas 3): the pods come back with
        # their names (and new IPs), and every key goes back to its pod.
        again = await build_keys(min_replicas=3)
        assert c.controller.ips[NAMES[2]] != old_ips[NAMES[2]]
        back = sum(again[i] == first[i] for i in keys)
        print(f"scale 1 -> 3: {back}/{len(keys)} keys back on their pods")
        assert back == len(keys)
