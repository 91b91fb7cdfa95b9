"""deploy/monitoring against the real gateway and the real Prometheus.

* The rules are valid for promtool, pass their unit tests (rules_test.yaml), and the
  PrometheusRule embeds exactly the groups of rules.yaml.
* Every metric name the rules and the Grafana dashboard use is one the gateway exposes, and
  every family the gateway exposes has a dashboard panel.
* End to end: Prometheus scrapes a gateway while builds run, with the rules loaded; its HTTP
  API shows the builds and healthy rules.

Waiting on Prometheus' eventual state (ready, scraped, rules evaluated) is a bounded poll of its
HTTP API: the pause between attempts paces retries against an external process, it is not
synchronisation; the whole wait is under an asyncio.timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

from gateway.app import Gateway
from tests.conftest import gateway_port, running_gateway, running_replicas
from tests.fakes import buildflow
from tests.fakes.replica import FakeReplica, JoinLimits
from tests.fakes.transport import Transport
from tests.integration.clients import connect

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; CI has it)")
NEEDS_PROMETHEUS = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus; CI has it)")

# A metric name of the gateway inside PromQL (digits too: http2_errors). Recording-rule names
# (level:metric:operation) are removed from expressions before matching.
METRIC = re.compile(r"(?<![\w:])buildkit_gateway_[a-z0-9_]+(?![\w:])")
SOLVE = "/moby.buildkit.v1.Control/Solve"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
# Families a test cannot easily produce samples for: only their HELP/TYPE lines are checked.
MAY_BE_EMPTY = {"buildkit_gateway_replica_ejections", "buildkit_gateway_probe_failures",
                "buildkit_gateway_queue_full", "buildkit_gateway_client_limits",
                "buildkit_gateway_tls_handshakes_refused",
                # Kubernetes discovery and autoscaling: no samples without a cluster
                "buildkit_gateway_kube_api_errors", "buildkit_gateway_kube_watch_restarts",
                "buildkit_gateway_scale_events", "buildkit_gateway_scaler_current_replicas",
                "buildkit_gateway_scaler_desired_replicas",
                "buildkit_gateway_scaler_starting_replicas", "buildkit_gateway_scaler_leader"}

T = TypeVar("T")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = load_yaml(RULES)["groups"]
    return groups


def rules() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return doc


def panels(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in doc["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def dashboard_exprs(doc: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(doc) for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        query = var.get("query")
        if var["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names(exprs: list[str]) -> set[str]:
    recorded = sorted((r["record"] for r in rules() if "record" in r), key=len, reverse=True)
    names: set[str] = set()
    for expr in exprs:
        for name in recorded:
            expr = expr.replace(name, " ")
        names |= set(METRIC.findall(expr))
    return names


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=MONITORING, capture_output=True, text=True, timeout=30,
                          check=False)


# ------------------------------------------------------------------------------ the files


@NEEDS_PROMTOOL
def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    assert PROMTOOL is not None
    checked = run(PROMTOOL, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(PROMTOOL, "test", "rules", "rules_test.yaml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_prometheusrule_embeds_exactly_the_rule_groups_of_rules_yaml() -> None:
    doc = load_yaml(MONITORING / "prometheusrule.yaml")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    assert doc["spec"]["groups"] == rule_groups()


def test_every_alert_has_severity_summary_description_and_for() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert set(alerts) >= {
        "BuildkitGatewayQueueWaitHigh", "BuildkitGatewayReplicaDown",
        "BuildkitGatewayNoReadyReplica", "BuildkitGatewayBuildFailureRatioHigh",
        "BuildkitGatewayNotReady", "BuildkitGatewayHTTP2Errors"}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name


def test_the_servicemonitor_scrapes_the_admin_port_of_the_gateway_service() -> None:
    doc = load_yaml(MONITORING / "servicemonitor.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert doc["spec"]["selector"] == {
        "matchLabels": {"app.kubernetes.io/name": "buildkit-gateway"}}
    [endpoint] = doc["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == (
        "admin", "/metrics", "15s")


def test_the_dashboard_uses_the_datasource_and_pool_variables() -> None:
    doc = dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    pool = variables["pool"]
    query = pool["query"]["query"] if isinstance(pool["query"], dict) else pool["query"]
    assert query == "label_values(buildkit_gateway_replicas, pool)"
    ids = [p["id"] for p in panels(doc)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(doc):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    for panel in panels(doc):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]


# ------------------------------------------------------------------------------ names


class Exposition:
    """Families (from # TYPE), families with # HELP, and sample names of /metrics texts."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.helps: set[str] = set()
        self.samples: set[str] = set()

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.types[name] = kind
            elif line.startswith("# HELP "):
                self.helps.add(line.split(" ", 3)[2])
            elif line and not line.startswith("#"):
                match = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
                assert match is not None, line
                self.samples.add(match.group())

    def family(self, series: str) -> str | None:
        """The family (as named in # TYPE) a series name belongs to."""
        for family, kind in self.types.items():
            base = family.removesuffix("_total") if kind == "counter" else family
            if any(series == base + suffix for suffix in SUFFIXES.get(kind, ("",))):
                return family
        return None

    def family_base(self, family: str) -> str:
        return family.removesuffix("_total") if self.types[family] == "counter" else family


async def scrape(session: aiohttp.ClientSession, gw: Gateway) -> str:
    assert gw.admin is not None
    async with session.get(f"http://127.0.0.1:{gw.admin.port}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def speak_http1(port: int) -> None:
    """An HTTP/1 client on the build port: the gateway counts an HTTP/2 error and hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
        await writer.drain()
        await reader.read()  # EOF: the gateway closed the connection
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def clients(port: int, n: int) -> AsyncIterator[list[Transport]]:
    conns = [await connect("grpc-go", port) for _ in range(n)]
    try:
        yield conns
    finally:
        for t in conns:
            await t.close()


@pytest.mark.timeout(60)
async def test_every_name_in_rules_and_dashboard_is_exposed_and_every_family_has_a_panel(
        ) -> None:
    # One replica, one slot: the second build queues. A third build names a shared session
    # that never opens and fails (the replica's session wait is cut to 0.5 s).
    async with (running_replicas(1, limits=JoinLimits(session=0.5)) as replicas,
                running_gateway([r.address for r in replicas], "--max-builds", "1") as gw,
                aiohttp.ClientSession() as session,
                asyncio.timeout(40)):
        replica = replicas[0]
        replica.solve_delay = 1.0
        port = gateway_port(gw)
        seen = Exposition()
        async with clients(port, 3) as (a, b, c):
            first = asyncio.create_task(buildflow.build(a, context_dir="/src/a", node_id="n1"))
            await replica.wait_for(lambda: bool(replica.active_builds()), timeout=10)
            second = asyncio.create_task(buildflow.build(b, context_dir="/src/b", node_id="n2"))
            seen.add(await scrape(session, gw))  # while a build runs: active builds, streams
            outcomes = [await first, await second]
            replica.solve_delay = 0
            failed = await buildflow.build(c, context_dir="/src/c", node_id="n3",
                                           shared_sessions={"ctx": "no-such-session"})
        await speak_http1(port)
        seen.add(await scrape(session, gw))

    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert not failed.ok
    assert "buildkit_gateway_queue_wait_seconds_count" in seen.samples  # the second one queued

    alert_names = metric_names([r["expr"] for r in rules()])
    dashboard_names = metric_names(dashboard_exprs(dashboard()))
    assert len(alert_names) >= 8 and len(dashboard_names) >= 20  # the regex finds them
    problems = []
    for name in sorted(alert_names | dashboard_names):
        family = seen.family(name)
        if family is None:
            problems.append(f"{name}: not a series of any family in /metrics")
        elif name not in seen.samples and seen.family_base(family) not in MAY_BE_EMPTY:
            problems.append(f"{name}: family {family} has no samples after the builds")
    assert not problems, "\n".join(problems)

    # Families without samples still show: prometheus_client prints # HELP and # TYPE for a
    # labelled metric with no children yet, which is what the check above relies on.
    for base in MAY_BE_EMPTY:
        family = next(f for f in seen.types if seen.family_base(f) == base)
        assert family in seen.helps, family

    dashboard_families = {seen.family(n) for n in dashboard_names}
    missing = {f for f in seen.types if f.startswith("buildkit_gateway_")} - dashboard_families
    assert not missing, f"families without a dashboard panel: {sorted(missing)}"


# ------------------------------------------------------------------------------ end to end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prometheus:
    """A real Prometheus on loopback scraping the gateway's admin port every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "buildkit-gateway",
                                "static_configs": [{"targets": [target]}]}],
        }
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert PROMETHEUS is not None
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                PROMETHEUS, f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            async with asyncio.timeout(10):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    async def get(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.tail()}")
        async with session.get(self.base + path, params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, session: aiohttp.ClientSession, expr: str) -> list[dict[str, Any]]:
        data = await self.get(session, "/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, session: aiohttp.ClientSession, expr: str) -> float | None:
        """The single value of an aggregating query (None while it has no result)."""
        result = await self.query(session, expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


async def eventually(what: str, attempt: Callable[[], Awaitable[tuple[bool, T]]], *,
                     timeout: float = 15, pace: float = 0.2) -> T:
    """Retry `attempt` until it reports success; fail with its last result after `timeout`."""
    last: T | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                done, last = await attempt()
                if done:
                    return last
                await asyncio.sleep(pace)  # retry pacing against the external server
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout}s; last: {last!r}") from None


async def until_ready(prom: Prometheus, session: aiohttp.ClientSession) -> None:
    async def attempt() -> tuple[bool, str]:
        assert prom.proc is not None
        if prom.proc.returncode is not None:
            raise AssertionError(f"prometheus exited {prom.proc.returncode}:\n{prom.tail()}")
        try:
            async with session.get(prom.base + "/-/ready") as resp:
                return resp.status == 200, f"HTTP {resp.status}"
        except aiohttp.ClientConnectionError as e:
            return False, repr(e)

    await eventually("prometheus ready", attempt)


def ok_solves(replicas: list[FakeReplica]) -> int:
    return sum(1 for r in replicas for rec in r.calls(SOLVE)
               if not rec.internal and rec.outcome == "ok")


@NEEDS_PROMETHEUS
@pytest.mark.timeout(60)
async def test_prometheus_scrapes_the_gateway_during_builds_and_loads_the_rules(
        tmp_path: Path) -> None:
    builds = 4
    async with (running_replicas(2) as replicas,
                running_gateway([r.address for r in replicas], "--max-builds", "1") as gw,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                asyncio.timeout(50)):
        for r in replicas:
            r.solve_delay = 2.0  # simulated build time: several scrapes see each build run
        assert gw.admin is not None
        prom = Prometheus(tmp_path, f"127.0.0.1:{gw.admin.port}")
        await prom.start()
        try:
            await until_ready(prom, session)

            async def scraped() -> tuple[bool, float | None]:
                up = await prom.value(session, 'up{job="buildkit-gateway"}')
                return up == 1, up

            await eventually("first scrape of the gateway", scraped)

            async with clients(gateway_port(gw), builds) as conns:
                outcomes = await asyncio.gather(*(
                    buildflow.build(t, context_dir=f"/src/p{i}", node_id=f"node{i}")
                    for i, t in enumerate(conns)))
            assert all(o.ok for o in outcomes), [o.error for o in outcomes]
            assert ok_solves(replicas) == builds

            async def finished() -> tuple[bool, float | None]:
                n = await prom.value(session, 'sum(buildkit_gateway_builds_finished_total'
                                              '{internal="false"})')
                return n == builds, n

            await eventually("all builds counted as finished", finished)
            peak = await prom.value(
                session, 'max_over_time(sum(buildkit_gateway_builds_active'
                         '{internal="false"})[1m:1s])')
            assert peak is not None and 1 <= peak <= 2, peak  # two replicas with one slot each
            queued = await prom.value(session, 'sum(buildkit_gateway_placements_total'
                                               '{outcome="queued"})')
            admitted = await prom.value(session, 'sum(buildkit_gateway_queue_wait_seconds_count'
                                                 '{outcome="admitted"})')
            assert queued is not None and queued >= 2, queued  # 4 builds, 2 slots
            assert admitted == queued

            async def rules_evaluated() -> tuple[bool, list[tuple[str, str, str]]]:
                data = await prom.get(session, "/api/v1/rules")
                states = [(g["name"], r["name"], r["health"])
                          for g in data["groups"] for r in g["rules"]]
                return bool(states) and all(h == "ok" for _g, _r, h in states), states

            states = await eventually("every rule evaluated", rules_evaluated)
            expected = [(g["name"], r.get("record") or r["alert"])
                        for g in rule_groups() for r in g["rules"]]
            assert sorted((g, r) for g, r, _h in states) == sorted(expected)  # API sorts groups

            async def recorded() -> tuple[bool, float | None]:
                rate = await prom.value(
                    session, 'pool_result:buildkit_gateway_builds_finished:rate5m'
                             '{job="buildkit-gateway", pool="default", result="ok"}')
                return rate is not None and rate > 0, rate

            await eventually("the recording rule sees the builds", recorded)
            ratio = await prom.value(session, 'pool:buildkit_gateway_build_failures:'
                                              'ratio_rate15m{pool="default"}')
            assert ratio == 0

            alerts = await prom.get(session, "/api/v1/alerts")
            assert alerts["alerts"] == []  # a healthy gateway raises nothing, not even pending
        finally:
            await prom.stop()
