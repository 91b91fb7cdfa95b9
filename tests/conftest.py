"""Shared fixtures: fake replicas and an in-process gateway on loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest

from gateway import config
from gateway.app import Gateway
from tests.fakes import kube
from tests.fakes.replica import FakeReplica, JoinLimits


@contextlib.asynccontextmanager
async def running_replicas(count: int, *, limits: JoinLimits | None = None,
                           prefix: str = "r") -> AsyncIterator[list[FakeReplica]]:
    replicas = [FakeReplica(f"{prefix}{i}", limits=limits or JoinLimits())
                for i in range(count)]
    for replica in replicas:
        await replica.start()
    try:
        yield replicas
    finally:
        for replica in replicas:
            await replica.stop(grace=0)


@contextlib.asynccontextmanager
async def running_gateway(replica_addresses: Sequence[str],
                          *extra: str) -> AsyncIterator[Gateway]:
    argv = ["--listen", "tcp://127.0.0.1:0", "--probe-interval", "0.5s",
            "--admin-listen", "127.0.0.1:0"]
    for address in replica_addresses:
        argv += ["--replica", f"tcp://{address}"]
    settings = config.load([*argv, *extra], {})
    gateway = Gateway(settings)
    task = asyncio.create_task(gateway.run(), name="gateway under test")
    try:
        async with asyncio.timeout(10):
            started = asyncio.create_task(gateway.started.wait())
            done, _ = await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # raises the start-up error
        yield gateway
    finally:
        gateway.stop.set()
        async with asyncio.timeout(40):
            await task


def gateway_port(gateway: Gateway) -> int:
    return gateway.listening[0].port


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def require_tool(name: str) -> str:
    """The path of a system tool a test needs; skip without it, unless CI requires tools."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian package; .ci/run installs it)"
        if os.environ.get("BUILDKIT_GATEWAY_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[kube.KubeCluster]:
    """One real kube-apiserver for the run: CI's (.ci/run starts it), else a private one."""
    cluster = kube.start_or_reuse()
    try:
        yield cluster
    finally:
        kube.stop(cluster)
