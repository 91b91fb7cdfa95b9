"""bench/: the benchmarks run end to end, and the upload benchmark catches a corrupting path.

Small sizes only: these check that the benchmark works and checks what it claims to check, not
how fast anything is (speed lives in the benchmark's own output).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes import kube

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import upload  # noqa: E402


@contextlib.asynccontextmanager
async def running_sink(*args: str) -> AsyncIterator[int]:
    """bench/sink.py with `args`, stopped on exit; yields its port."""
    sink = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bench" / "sink.py"), "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert sink.stdout is not None
        line = (await asyncio.wait_for(sink.stdout.readline(), 15)).decode()
        assert line.startswith("SINK READY"), line
        yield int(line.split()[2])
    finally:
        sink.terminate()
        await asyncio.wait_for(sink.wait(), 10)


def test_both_kinds_of_ends_through_the_gateway(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "upload.py"), "--size-mb", "2", "--repeats", "2",
         "--legs", "direct,gateway", "--json", str(out), "--deadline", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ends = json.loads(out.read_text())["ends"]
    assert set(ends) == {"lean", "work"}
    for legs in ends.values():
        for name in ("direct", "gateway"):
            leg = legs[name]
            assert "skipped" not in leg, leg
            assert len(leg["runs"]) == 2 and not leg["errors"]
            # every byte and message arrived: the sink's counters went back in the trailers
            assert all(r["sink_bytes"] == r["wire_bytes"] for r in leg["runs"])
    assert "SUMMARY gateway [work ends]" in result.stdout


def test_tls_legs_through_the_gateway(tmp_path: Path) -> None:
    # --tls: TLS sink, client offering ALPN h2, the gateway's TLS listener dialing the sink over
    # TLS; the ratios are against TLS direct, and the client checked ALPN h2 on both hops.
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "upload.py"), "--tls", "--size-mb", "2",
         "--repeats", "2", "--legs", "direct,gateway", "--json", str(out), "--deadline", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["tls"] is True and set(report["ends"]) == {"lean", "work"}
    for legs in report["ends"].values():
        for name in ("direct", "gateway"):
            leg = legs[name]
            assert "skipped" not in leg, leg
            assert len(leg["runs"]) == 2 and not leg["errors"]
            assert all(r["sink_bytes"] == r["wire_bytes"] for r in leg["runs"])
            assert all(r["tls"].endswith(" h2") and r["sink_tls"].endswith(" h2")
                       for r in leg["runs"])
    for ends in ("lean", "work"):
        assert f"SUMMARY gateway [{ends} ends, TLS]: direct/path " in result.stdout
        assert "(TLS direct " in result.stdout


async def test_work_sink_reports_the_hash_the_client_checks(tmp_path: Path) -> None:
    async with running_sink("--work-dir", str(tmp_path)) as port:
        payload = upload.Payload(1 << 20, (24000, 4000, 2500))
        payload.to_file(tmp_path / "context.bin")
        try:
            for _ in range(2):
                result = await upload.upload_once(port, payload, 10)
                assert result.sink_messages == payload.messages
            # The sink's file holds at most the last upload (emptied after each): tmpfs does not
            # fill up over a run.
            one_upload = payload.wire_bytes - 5 * payload.messages
            assert (tmp_path / "received.bin").stat().st_size <= one_upload
            payload.sha256 = "0" * 64  # as if a byte had changed on the way
            with pytest.raises(upload.UploadError, match="sha256"):
                await upload.upload_once(port, payload, 10)
        finally:
            payload.close_file()


def test_downloads_through_the_gateway(tmp_path: Path) -> None:
    # --direction download: the sink streams the result back on the Session once the Solve
    # arrives; through the gateway that is a relayed Session + Solve to the replica.
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "upload.py"), "--direction", "download",
         "--size-mb", "2", "--repeats", "2", "--legs", "direct,gateway", "--json", str(out),
         "--deadline", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["directions"] == ["download"] and "ends" not in report
    assert set(report["download"]) == {"lean", "work"}
    for legs in report["download"].values():
        for name in ("direct", "gateway"):
            leg = legs[name]
            assert "skipped" not in leg, leg
            assert len(leg["runs"]) == 2 and not leg["errors"]
            # the sink sent every byte (its trailers) and the client counted them all
            assert all(r["sink_bytes"] == r["wire_bytes"] for r in leg["runs"])
            assert all(r["frames"] == r["sink_frames"] for r in leg["runs"])
    for ends in ("lean", "work"):
        assert f"SUMMARY gateway [{ends} ends, download]: direct/path " in result.stdout
    assert "SUMMARY gateway [work ends]:" not in result.stdout  # no upload was asked for


async def _corrupting_proxy(sink_port: int) -> asyncio.Server:
    """A TCP proxy that flips one byte in the first large DATA frame from the server: a path
    that corrupts a download without changing its length."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   corrupt: bool) -> None:
        buf = bytearray()
        flipped = not corrupt
        try:
            while data := await reader.read(1 << 16):
                if flipped:
                    writer.write(data)
                    continue
                buf += data
                while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                    n = int.from_bytes(buf[:3], "big")
                    if buf[3] == 0 and n > 1000:  # DATA: a byte inside a message's data
                        buf[9 + n // 2] ^= 0xFF
                        flipped = True
                        break
                    writer.write(bytes(buf[: 9 + n]))
                    del buf[: 9 + n]
                if flipped:
                    writer.write(bytes(buf))
                    buf.clear()
        finally:
            writer.close()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", sink_port)
        await asyncio.gather(pipe(c_reader, s_writer, False), pipe(s_reader, c_writer, True),
                             return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_a_corrupted_download_fails_the_sha256_check(tmp_path: Path) -> None:
    payload = upload.Payload(1 << 20, (24000, 4000, 2500))
    payload.write(tmp_path / "result.bin")
    output = upload.OutputWork(tmp_path)
    try:
        async with running_sink("--work-dir", str(tmp_path),
                                "--serve", str(tmp_path / "result.bin")) as port:
            for _ in range(2):
                result = await upload.download_once(port, payload, 10, work=output)
                assert result.sink_messages == payload.messages
            # The client's file holds at most the last download (emptied after each).
            assert (tmp_path / "download.bin").stat().st_size == 0
            proxy = await _corrupting_proxy(port)
            try:
                proxy_port = proxy.sockets[0].getsockname()[1]
                with pytest.raises(upload.UploadError, match="sha256"):
                    await upload.download_once(proxy_port, payload, 10, work=output)
            finally:
                proxy.close()
    finally:
        output.close()


def test_calls_bench_interleaves_the_legs_for_latency(tmp_path: Path) -> None:
    out = tmp_path / "calls.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "calls.py"), "--rounds", "1", "--calls", "40",
         "--latency-calls", "20", "--warmup", "5", "--concurrency", "4",
         "--legs", "direct,gateway", "--json", str(out), "--time-limit", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())["result"]
    for name in ("ListWorkers", "Content/Info"):
        assert doc["gateway"]["calls"][name]["errors"] == 0
        step = doc["interleaved"][name]
        assert step["errors"] == 0 and set(step["p50_ms"]) == {"direct", "gateway"}
        assert step["added_ms"]["gateway"] is not None
    assert "interleaved: added p50 gateway" in result.stdout


def test_relay_micro_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "relay_micro.py"), "--reads", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "relay DATA path" in result.stdout


async def test_unary_micro_records_and_replays_with_cold_caches(tmp_path: Path) -> None:
    micro = [sys.executable, str(ROOT / "bench" / "unary_micro.py"),
             "--log", str(tmp_path / "log.pkl")]
    async with running_sink() as port:
        recorded = await asyncio.create_subprocess_exec(
            *micro, "--record", str(port), "--calls", "40", "--callers", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT)
        out, _ = await asyncio.wait_for(recorded.communicate(), 60)
        assert recorded.returncode == 0, out.decode()
    replayed = await asyncio.create_subprocess_exec(
        *micro, "--cold", "1", "--repeats", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT)
    out, _ = await asyncio.wait_for(replayed.communicate(), 60)
    assert replayed.returncode == 0, out.decode()
    # every call counted from the log's own frames, and each one ended (asserted inside)
    assert "(40 calls, caches evicted (1 MiB)" in out.decode(), out.decode()


def test_scaling_runs_against_the_kube_apiserver(kube_cluster: kube.KubeCluster) -> None:
    # The session's cluster (CI's, or a private one; skipped like the kube tests without an
    # apiserver), reused by the benchmark through the same variable as CI's.
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scaling.py"), "--runs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
        env={**os.environ, kube.REUSE_ENV: str(kube_cluster.dir)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(reused" in result.stdout  # not a second apiserver of its own
    for row in ("API round trip: read scale (baseline",
                "at zero, 0->1: queue -> scale update sent",
                "at zero, 0->1: pod Ready -> build dispatched",
                "at 1 busy replica, 1->2: queue -> scale update sent",
                "in API round trips"):
        assert row in result.stdout, result.stdout
