"""The /status page rendered by a real browser: headless Chromium against a busy gateway.

Three fake replicas, one of them stopped; `--max-builds 1`, so of five long builds two run and
three wait. Two quick builds finish first, for the recent-builds table. Chromium loads the page
(its script fetches /api/status), and the DOM it dumps after the script ran must show every
replica with its state, the running builds, the queue and the recent builds; one build's Ref
is markup, which must come out as text. A screenshot goes to $STATUS_SCREENSHOT (default: a
tmp path). Skipped when Chromium is not installed (failed instead under CI's
BUILDKIT_GATEWAY_REQUIRE_TOOLS).

The Kubernetes parts (the API line, a pool's scaling and discovery lines) are rendered from
canned /api/status documents (tests/unit/test_admin_table.py's, shaped like the real one): a
small aiohttp server serves the real page and the document. With "kubernetes": null the page
shows no such line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.app import Gateway
from tests.conftest import gateway_port, require_tool, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.ids import new_id
from tests.integration.clients import client
from tests.integration.test_admission import QueueWatch
from tests.unit.test_admin_table import kube_document, plain_document

EVIL_REF = '<img src=x onerror="alert(1)">&amp;'
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=3000")


class Dom(HTMLParser):
    """The rendered page: its tags, its text (also by element id), the attributes of elements
    with an id and its tables (rows of cells' text, the header row first)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._ids: list[str | None] = []
        self.by_id: dict[str, list[str]] = {}
        self.attrs: dict[str, dict[str, str | None]] = {}
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        ident = dict(attrs).get("id")
        if tag not in ("br", "img", "meta", "input", "hr", "link"):
            self._ids.append(ident)
            if ident:
                self.by_id.setdefault(ident, [])
                self.attrs[ident] = dict(attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None
        if self._ids and tag not in ("br", "img", "meta", "input", "hr", "link"):
            self._ids.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        for ident in self._ids:
            if ident:
                self.by_id[ident].append(data)

    def text_of(self, ident: str) -> str:
        return " ".join("".join(self.by_id.get(ident, [])).split())

    def table(self, header: str) -> list[list[str]]:
        """The body rows of every table whose first column is headed `header`."""
        return [row for t in self.tables if t and t[0][:1] == [header] for row in t[1:]]

    def row(self, header: str, first: str) -> list[str]:
        """The row of such a table whose first cell's first word is `first`."""
        found = [r for r in self.table(header) if r and r[0].split(" ")[0] == first]
        assert len(found) == 1, (first, self.tables)
        return found[0]


def short(ref: str) -> str:
    """A Ref as the page shows it."""
    return ref if len(ref) <= 14 else ref[:12] + "\u2026"


async def chromium(exe: str, url: str, tmp: Path, name: str, *args: str) -> bytes:
    """Runs headless Chromium (own session, so a hung browser can be killed) without
    blocking the event loop the gateway runs in; returns its stdout."""
    proc = await asyncio.create_subprocess_exec(
        exe, *FLAGS, f"--user-data-dir={tmp / ('profile-' + name)}", *args, url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise AssertionError(f"chromium ({name}) did not finish in 60 s") from None
    assert proc.returncode == 0, (name, proc.returncode, err.decode(errors="replace")[-2000:])
    return out


def replica_states(gw: Gateway) -> dict[str, tuple[bool, bool]]:
    assert gw.hub is not None
    return {r.id: (r.ready, r.ejected) for r in gw.hub.registry.snapshot.replicas}


@pytest.fixture
def screenshot(tmp_path: Path) -> Path:
    """$STATUS_SCREENSHOT, else a tmp path; no file there yet."""
    shot = Path(os.environ.get("STATUS_SCREENSHOT") or tmp_path / "status.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.unlink(missing_ok=True)
    return shot


async def test_status_page_renders_replicas_queue_and_recent_builds(
        tmp_path: Path, screenshot: Path) -> None:
    exe = require_tool("chromium")
    tasks: list[asyncio.Task[buildflow.BuildOutcome]] = []
    async with running_replicas(3) as replicas, running_gateway(
            [r.address for r in replicas], "--max-builds", "1") as gw, \
            contextlib.AsyncExitStack() as clients:
        hub = gw.hub
        assert hub is not None and gw.admin is not None
        watch = QueueWatch(gw)  # wakes on queue and ledger changes
        hub.registry.subscribe(lambda _snap: watch.changed.set())  # and on replica states
        port, admin = gateway_port(gw), gw.admin.port
        ids = [r.address for r in replicas]
        try:
            await watch.until(lambda: all(ready for ready, _ in replica_states(gw).values()))
            # two quick builds finish first: the recent-builds table
            for r in replicas:
                r.solve_delay = 0.2
            quick = [await clients.enter_async_context(client("grpc-go", port))
                     for _ in range(2)]
            done = await asyncio.gather(*(
                buildflow.build(t, context_dir=f"/src/done{i}", node_id=new_id())
                for i, t in enumerate(quick)))
            assert all(o.ok for o in done), [o.error for o in done]
            # one replica goes away: it shows as not ready (or ejected)
            await replicas[2].stop(grace=0)
            await watch.until(lambda: replica_states(gw)[ids[2]] != (True, False))
            # five long builds on two replicas of one slot each: two run, three wait
            for r in replicas[:2]:
                r.solve_delay = 60
            refs = [EVIL_REF] + [new_id() for _ in range(4)]
            for i, ref in enumerate(refs):
                t = await clients.enter_async_context(client("grpc-go", port))
                tasks.append(asyncio.create_task(buildflow.build(
                    t, context_dir=f"/src/p{i}", node_id=new_id(), ref=ref, timeout=90)))
            await watch.until(lambda: (
                len([b for b in hub.ledger.active() if not b.internal]) == 2
                and hub.queued() == 3))

            url = f"http://127.0.0.1:{admin}/status"
            dumped, _ = await asyncio.gather(
                chromium(exe, url, tmp_path, "dom", "--dump-dom"),
                chromium(exe, url, tmp_path, "shot", f"--screenshot={screenshot}",
                         "--window-size=1280,900"))
        finally:  # the long builds end now (their connections close after this)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)

    html = dumped.decode()
    dom = Dom(html)
    text = " ".join("".join(dom.text).split())
    # the script ran and the fetch succeeded
    assert dom.text_of("updated").startswith("updated "), dom.text_of("updated")
    assert dom.text_of("notice") == ""
    assert dom.text_of("state") == "ready"
    assert dom.text_of("version") not in ("", "\u2013", "?")
    assert dom.text_of("pool-default") == "Pool default"
    assert "2/3 replicas ready" in text and "2 running, 0 free slots" in text, text
    assert "3 waiting" in text, text
    # every replica, with its state, reason and load
    for rid in ids[:2]:
        row = dom.row("Replica", rid)
        assert row[1] == "ready", row
        assert row[3].startswith("1 / 1"), row
    down = dom.row("Replica", ids[2])
    assert down[1] in ("not ready", "ejected"), down
    assert down[2], down  # the reason
    assert down[3].startswith("0 / 1"), down
    # the queue: positions 1..3, each waiting for any replica
    queue = dom.table("Position")
    assert [r[0] for r in queue] == ["1 (next)", "2", "3"], queue
    assert all(r[2].startswith("waiting ") and r[3] == "any replica" for r in queue), queue
    # running and waiting builds are listed by their shortened Ref
    shown = " ".join([*(dom.row("Replica", rid)[4] for rid in ids[:2]), *(r[1] for r in queue)])
    for ref in refs:
        assert short(ref) in shown, (ref, shown)
    # markup in a Ref is text, never an element
    assert "img" not in dom.tags
    # the recent builds: both quick ones, ok, with their replica and a duration
    for o in done:
        row = dom.row("Build", short(o.ref))
        assert row[1] == "default", row
        assert row[2] in ids, row
        assert row[3].endswith(" s"), row
        assert row[4] == "ok", row
    # the screenshot
    data = await asyncio.to_thread(screenshot.read_bytes)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", screenshot
    assert 20_000 < len(data) < 5_000_000, len(data)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 900), (width, height)


@contextlib.asynccontextmanager
async def canned_status(doc: dict[str, Any]) -> AsyncIterator[str]:
    """The real status page and `doc` as its /api/status, on a local port; yields the page's
    URL."""
    page = resources.files("gateway.admin").joinpath("status.html").read_bytes()

    async def status_page(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    async def api_status(request: web.Request) -> web.Response:
        return web.json_response(doc)

    app = web.Application()
    app.router.add_get("/status", status_page)
    app.router.add_get("/api/status", api_status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}/status"
    finally:
        await runner.cleanup()


async def test_status_page_shows_kubernetes_api_and_scaling(
        tmp_path: Path, screenshot: Path) -> None:
    exe = require_tool("chromium")
    shot = screenshot.with_name(screenshot.stem + "-kube" + screenshot.suffix)
    shot.unlink(missing_ok=True)
    async with canned_status(kube_document()) as url:
        dumped, _ = await asyncio.gather(
            chromium(exe, url, tmp_path, "dom", "--dump-dom"),
            chromium(exe, url, tmp_path, "shot", f"--screenshot={shot}",
                     "--window-size=1280,900"))
    dom = Dom(dumped.decode())
    assert dom.text_of("updated").startswith("updated "), dom.text_of("updated")
    assert dom.text_of("notice") == ""
    # the API line: state, for how long, the last error
    assert "hidden" not in dom.attrs["kubernetes"], dom.attrs["kubernetes"]
    assert dom.text_of("kubernetes") == (
        "Kubernetes API unreachable for 42 s \u2014 list pods: HTTP 503: Service Unavailable")
    # the scaled pool: its Deployment's counts, the victim draining, the pod leaving
    assert dom.text_of("scaling-default") == (
        "Deployment builds/buildkitd: current 3, desired 5 (1..10, target 2 builds per "
        "replica), starting 2, draining: buildkitd-7d9f-c, leaving: buildkitd-7d9f-d")
    assert dom.text_of("events-default") == (
        "Scale events (scale-down window 5m 00s): down 4\u21923, 12 s ago \u00b7 "
        "up 1\u21924, 5m 30s ago \u00b7 up 0\u21921, 1h 02m ago")
    assert dom.text_of("discovery-default") == (
        "Pods: 4 in namespace builds matching app=buildkitd (resource version 48213)")
    assert [dom.row("Replica", f"buildkitd-7d9f-{c}")[1] for c in "abcd"] == [
        "ready", "ready", "draining", "draining"]
    # the pool that is discovered but not scaled: its pods, no scaling line
    assert dom.text_of("pool-arm") == "Pool arm"
    assert "scaling-arm" not in dom.by_id and "events-arm" not in dom.by_id
    assert dom.text_of("discovery-arm") == (
        "Pods: 1 in namespace builds matching app=buildkitd-arm (resource version 48190)")
    assert dom.row("Replica", "buildkitd-arm-0")[1:3] == ["not ready", "connection refused"]
    data = await asyncio.to_thread(shot.read_bytes)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", shot


async def test_status_page_without_kubernetes_shows_no_kubernetes_line(tmp_path: Path) -> None:
    exe = require_tool("chromium")
    async with canned_status(plain_document()) as url:
        dumped = await chromium(exe, url, tmp_path, "dom", "--dump-dom")
    dom = Dom(dumped.decode())
    text = dom.text_of("pools")
    assert dom.text_of("updated").startswith("updated "), dom.text_of("updated")
    assert "hidden" in dom.attrs["kubernetes"] and dom.text_of("kubernetes") == ""
    assert not [i for i in dom.by_id if i.startswith(("scaling-", "events-", "discovery-"))]
    for word in ("Kubernetes", "Deployment", "Scale events", "starting", "draining"):
        assert word not in text, (word, text)
    # the rest renders as before
    assert dom.text_of("pool-default") == "Pool default" and dom.text_of("pool-arm") == "Pool arm"
    assert "4/4 replicas ready" in text, text
