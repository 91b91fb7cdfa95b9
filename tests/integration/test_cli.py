"""The command line: help, clear configuration errors, foreground run until SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

from gateway.config import OPTIONS
from tests.conftest import running_replicas
from tests.fakes import buildflow
from tests.fakes.transport import RpcError
from tests.integration.clients import client, connect

CMD = [sys.executable, "-m", "gateway"]


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CMD, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_help_lists_every_option_with_its_environment_variable() -> None:
    code, out, _err = await _run("--help")
    assert code == 0
    for opt in OPTIONS:
        assert opt.flag in out
        assert opt.env in out.replace("\n", "").replace(" ", "")


async def test_invalid_settings_exit_2_naming_the_option_and_source(tmp_path) -> None:
    code, _out, err = await _run("--loadbalance", "roundrobin")
    assert code == 2
    assert "invalid --loadbalance from flag --loadbalance" in err
    code, _out, err = await _run(env={"BUILDKIT_GATEWAY_REPLICA": "http://nope"})
    assert code == 2
    assert "environment variable BUILDKIT_GATEWAY_REPLICA" in err
    bad = tmp_path / "gw.yaml"
    bad.write_text("listen: [tcp://127.0.0.1:1\n")
    code, _out, err = await _run("--config", str(bad))
    assert code == 2
    assert "is not valid YAML" in err
    bad.write_text("replicas: [tcp://127.0.0.1:1]\n")
    code, _out, err = await _run("--config", str(bad))
    assert code == 2
    assert "unknown option(s) replicas" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_runs_in_the_foreground_serves_builds_and_exits_0_on_sigterm(tmp_path) -> None:
    async with running_replicas(2) as replicas:
        port = _free_port()
        config = tmp_path / "gw.yaml"
        config.write_text(f"replica:\n  - tcp://{replicas[0].address}\n")
        proc = await asyncio.create_subprocess_exec(
            *CMD, "--listen", f"tcp://127.0.0.1:{port}", "--config", str(config),
            "--admin-listen", "127.0.0.1:0",
            "--log-format", "json",
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "BUILDKIT_GATEWAY_REPLICA": f"tcp://{replicas[1].address}"})
        try:
            assert proc.stderr is not None
            async with asyncio.timeout(20):
                while b'"msg": "gateway listening"' not in (line := await proc.stderr.readline()):
                    assert line, "gateway exited before listening"
            assert replicas[1].address in line.decode()  # env beats the file
            async with client("grpc-go", port) as t:
                out = await buildflow.buildctl(t, context_dir="/src")
            assert out.ok, out.error
            assert out.replica == "r1"
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                code = await proc.wait()
            assert code == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def test_sigterm_lets_10_builds_finish_refuses_new_connections_and_exits_0() -> None:
    async with running_replicas(2) as replicas:
        for r in replicas:
            r.solve_delay = 4.0  # all 10 are running at once, even on a busy machine
        port = _free_port()
        proc = await asyncio.create_subprocess_exec(
            *CMD, "--listen", f"tcp://127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0",
            "--log-format", "json", *(a for r in replicas for a in ("--replica",
                                                                     f"tcp://{r.address}")),
            stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        conns = []
        try:
            async with asyncio.timeout(20):
                while b'"msg": "gateway listening"' not in (line := await proc.stderr.readline()):
                    assert line, "gateway exited before listening"
            conns = [await connect("grpc-go" if i % 2 else "grpcio", port) for i in range(10)]
            builds = [asyncio.create_task(buildflow.build(t, context_dir=f"/src/{i}",
                                                          node_id=f"{i:016x}"))
                      for i, t in enumerate(conns)]
            def all_running() -> bool:
                return sum(len(r.active_builds(include_internal=False)) for r in replicas) == 10

            # Each replica re-checks on its own changes: wait for whichever sees it first.
            waits = [asyncio.create_task(r.wait_for(all_running, 20)) for r in replicas]
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
            await next(iter(done))
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                while b'"msg": "gateway stopping"' not in (line := await proc.stderr.readline()):
                    assert line, "gateway exited before stopping"
            refused = None
            try:
                await connect("grpc-go", port)
            except RpcError as exc:
                refused = exc
            outs = await asyncio.gather(*builds)
            async with asyncio.timeout(20):
                code = await proc.wait()
        finally:
            for t in conns:
                await t.close()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert all(o.ok for o in outs), [o.error for o in outs]
    assert refused is not None and refused.code == 14
    assert code == 0
