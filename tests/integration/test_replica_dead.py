"""A replica that vanishes without closing (node lost, process frozen): --replica-dead-after.

The fake replicas run in this process, so a frozen one is simulated by a TCP forwarder between
the gateway and the replica that stops moving bytes both ways while keeping every socket open:
to the gateway the replica is there but answers nothing, probes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Sequence

from gateway.control.probe import is_dead
from gateway.errors import UNAVAILABLE
from gateway.replicas.registry import Snapshot
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import node_id
from tests.fakes.replica import BUILD_SECONDS, FakeReplica
from tests.integration.clients import connect
from tests.integration.test_admission import QueueWatch
from tests.integration.test_operate import scrape, total

DEAD_AFTER = 1.5
PROBE_ROUND = 0.2 + 0.3  # --probe-interval + --probe-timeout: how often a frozen one fails
BUILD_TIME = 4.0  # simulated: long enough to outlast the verdict on a frozen replica


def fast_probes(dead_after: float) -> tuple[str, ...]:
    return ("--probe-interval", "0.2s", "--probe-timeout", "0.3s",
            "--replica-dead-after", f"{dead_after}s", "--loadbalance", "random")


class FreezableProxy:
    """Forwards TCP to a replica; frozen, it moves no byte either way and closes nothing."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.address = ""
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()

    async def _accepted(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                await self._flowing.wait()  # frozen: hold this, read no more
                writer.write(data)
                await writer.drain()
            await self._flowing.wait()  # a frozen peer does not see the other end go either
        except OSError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def proxies_for(replicas: Sequence[FakeReplica]) -> AsyncIterator[list[FreezableProxy]]:
    proxies = [FreezableProxy(r.address) for r in replicas]
    try:
        for proxy in proxies:
            await proxy.start()
        yield proxies
    finally:
        for proxy in proxies:
            await proxy.close()


async def until(changed: asyncio.Event, predicate: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            changed.clear()
            await changed.wait()


async def solving(replica: FakeReplica) -> None:
    """Returns once a (non-internal) Solve runs on the replica."""
    await replica.wait_for(lambda: bool(replica.active_builds(include_internal=False)),
                           timeout=10)


def test_the_verdict_needs_failures_for_dead_after_and_builds_on_the_replica() -> None:
    assert is_dead(100.0, 160.0, dead_after=60, busy=True)
    assert not is_dead(100.0, 159.9, dead_after=60, busy=True)  # not yet
    assert not is_dead(100.0, 500.0, dead_after=60, busy=False)  # nothing runs there
    assert not is_dead(None, 500.0, dead_after=60, busy=True)  # its last probe answered
    assert not is_dead(100.0, 500.0, dead_after=0, busy=True)  # 0: never
    assert not is_dead(100.0, 100.0, dead_after=0.001, busy=True)  # one failure never does


async def test_a_frozen_replica_ends_its_builds_after_dead_after_others_finish() -> None:
    async with running_replicas(2) as replicas, proxies_for(replicas) as proxies, \
            running_gateway([p.address for p in proxies], *fast_probes(DEAD_AFTER)) as gw:
        conns = [await connect("grpc-go", gateway_port(gw)) for _ in range(4)]
        watch = QueueWatch(gw)
        try:
            tasks = [asyncio.create_task(buildflow.build(
                t, context_dir=f"/src/d{i}", node_id=node_id(), rng=random.Random(i),
                frontend_attrs={BUILD_SECONDS: str(BUILD_TIME)})) for i, t in enumerate(conns)]
            await watch.until(lambda: len(watch.admitted) == 4)
            await asyncio.gather(*(solving(r) for r in replicas))
            loads = dict(gw.ledger.loads())
            assert all(loads.get(p.address) for p in proxies), loads  # both replicas build
            frozen, healthy = proxies
            on_frozen = {rec.ref for rec in gw.ledger.active() if rec.replica == frozen.address}
            loop = asyncio.get_running_loop()
            frozen.freeze()  # node lost: no answer, no FIN, no RST
            frozen_at = loop.time()
            ended: dict[str, float] = {}
            for next_done in asyncio.as_completed(tasks):
                out = await next_done
                ended[out.ref] = loop.time() - frozen_at
            outs = [t.result() for t in tasks]
        finally:
            for t in conns:
                await t.close()
        snapshot = gw.registry.snapshot

    lost = [o for o in outs if o.ref in on_frozen]
    assert len(lost) == loads[frozen.address]
    for o in lost:
        assert not o.ok
        assert o.error_code == UNAVAILABLE, o.error
        assert f"BuildKit replica {frozen.address} lost" in (o.error or ""), o.error
        assert "stopped answering" in (o.error or "")
        assert f"--replica-dead-after {DEAD_AFTER:g}s" in (o.error or "")
        # The first failure is seen within a probe round of the freeze, the verdict at the
        # first failed probe DEAD_AFTER later: at most a round after that.
        assert DEAD_AFTER <= ended[o.ref] < DEAD_AFTER + 2 * PROBE_ROUND + 1.0, ended[o.ref]
    others = [o for o in outs if o.ref not in on_frozen]
    assert len(others) == loads[healthy.address]
    assert all(o.ok for o in others), [o.error for o in others]
    assert not snapshot.by_id[frozen.address].placeable  # ejected: no new builds there
    assert snapshot.by_id[healthy.address].placeable


async def test_a_replica_frozen_for_less_than_dead_after_loses_nothing() -> None:
    dead_after, freeze_for = 3.0, 2.0  # frozen longer than the first test's verdict came
    async with running_replicas(1) as replicas, proxies_for(replicas) as proxies, \
            running_gateway([p.address for p in proxies], *fast_probes(dead_after)) as gw:
        (proxy,) = proxies
        changed = asyncio.Event()
        ejected: list[bool] = []

        def seen(snap: Snapshot) -> None:
            ejected.append(snap.by_id[proxy.address].ejected)
            changed.set()

        def ready() -> bool:
            return gw.registry.snapshot.by_id[proxy.address].ready

        gw.registry.subscribe(seen)
        conn = await connect("grpc-go", gateway_port(gw))
        try:
            build = asyncio.create_task(buildflow.build(
                conn, context_dir="/src/thaw", node_id=node_id(), rng=random.Random(7),
                frontend_attrs={BUILD_SECONDS: str(BUILD_TIME)}))
            await solving(replicas[0])
            loop = asyncio.get_running_loop()
            proxy.freeze()
            frozen_at = loop.time()
            # Probes fail: the replica is marked not ready (takes no new builds) ...
            await until(changed, lambda: not ready(), timeout=freeze_for)
            # ... and stays frozen for the scenario's time, less than --replica-dead-after.
            await asyncio.sleep(max(0.0, frozen_at + freeze_for - loop.time()))
            proxy.thaw()
            thawed_after = loop.time() - frozen_at
            async with asyncio.timeout(BUILD_TIME + 10):
                out = await build
            await until(changed, ready, timeout=5)
        finally:
            await conn.close()
        samples = await scrape(gw)

    assert out.ok, out.error
    assert thawed_after < dead_after
    assert total(samples, "buildkit_gateway_probe_failures_total",
                 replica=proxy.address) >= 2  # failed probes in a row, then it answered
    assert not any(ejected)
    records = [r for r in replicas[0].calls("/moby.buildkit.v1.Control/Solve")
               if not r.internal]
    assert [r.outcome for r in records] == ["ok"]
