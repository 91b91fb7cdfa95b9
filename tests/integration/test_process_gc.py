"""The gateway's own process settles the cyclic GC once started; embedded gateways do not."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from gateway import config
from gateway.app import Gateway


@pytest.fixture
def restored_gc() -> Iterator[None]:
    try:
        yield
    finally:
        gc.unfreeze()


async def _started(gateway: Gateway) -> asyncio.Task[None]:
    task = asyncio.create_task(gateway.run(), name="gateway under test")
    async with asyncio.timeout(10):
        started = asyncio.create_task(gateway.started.wait())
        done, _ = await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
    return task


@pytest.mark.parametrize("settle", [True, False])
async def test_start_up_objects_are_frozen_only_in_the_gateways_own_process(
        settle: bool, restored_gc: None) -> None:
    gc.unfreeze()
    settings = config.load(["--listen", "tcp://127.0.0.1:0", "--admin-listen", "127.0.0.1:0"], {})
    gateway = Gateway(settings, settle_gc=settle)
    task = await _started(gateway)
    try:
        if settle:
            assert gc.get_freeze_count() > 10_000  # imports, grpcio, aiohttp, the gateway
        else:
            assert gc.get_freeze_count() == 0
    finally:
        gateway.stop.set()
        async with asyncio.timeout(30):
            await task
