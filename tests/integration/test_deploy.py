"""deploy/, the Dockerfile and the configuration reference, checked without a Docker engine or a
real cluster's nodes.

* Every overlay renders with `kubectl kustomize` (kustomize as kubectl ships it), and every
  component is used by some overlay, so each one renders too.
* Every rendered object is valid against a current Kubernetes's OpenAPI schemas, offline
  (kubernetes-validate, strict: unknown fields fail); the only kinds without a schema are the
  Prometheus Operator's, named below.
* Every kind the test kube-apiserver (v1.20) serves passes its server-side dry run (its
  defaulting, validation and admission, as `kubectl apply --server-side`); the kinds skipped are
  named in `NOT_SERVED`, and the test checks that the server indeed does not serve them.
* The gateway container's arguments, environment and mounted files, taken from the rendered
  manifests, start a gateway against the test cluster (as a pod would: the service account's
  token and namespace, POD_NAME, the ConfigMap and Secrets at their mount paths) with the
  overlay's own Role, and it turns ready (/readyz 200) on the pods of the rendered buildkitd
  workloads, with no API call refused. Only the listening addresses move to free loopback ports.
* The Role grants exactly the Kubernetes API calls the gateway's code makes (read from the
  source), and every overlay's Role names the Deployments its configuration scales.
* Every buildx Kubernetes driver option has its place (`DRIVER_OPTIONS`).
* The Dockerfile copies only files that exist and that .dockerignore lets in, installs the lock
  of the README's install command, and its runtime stage installs nothing and runs as non-root.
* docs/configuration.md is what hack/config-reference prints, and lists every option of
  `buildkit-gateway --help` with its environment variable and default.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import copy
import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import trustme
import yaml
from kubernetes_asyncio import client

from gateway import config
from gateway.app import Gateway
from tests.conftest import require_tool
from tests.fakes import kube
from tests.fakes.replica import FakeReplica
from tests.integration.test_kube_scaling import in_cluster_files, used

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = [
    "base",
    *sorted(
        f"overlays/{p.name}"
        for p in (DEPLOY / "overlays").iterdir()
        if (p / "kustomization.yaml").is_file()
    ),
]
KUBECTL_TIMEOUT = 30
START_TIMEOUT = 20.0

# Kinds the test kube-apiserver (v1.20) does not serve, by name, and why; the dry run skips
# only these, and test_server_side_dry_run checks that the server indeed lacks them.
NOT_SERVED = {
    ("policy/v1", "PodDisruptionBudget"): "policy/v1 arrived in Kubernetes 1.21",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "a CRD of the Prometheus Operator",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "a CRD of the Prometheus Operator",
}
# Kinds kubernetes-validate has no schema for (custom resources).
NO_SCHEMA = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# The oldest Kubernetes these manifests are checked against besides the newest schemas the
# locked kubernetes-validate ships.
OLDEST_CURRENT = "1.31.0"

Obj = dict[str, Any]


# ------------------------------------------------------------------------------- rendering


def kubectl() -> str:
    return require_tool("kubectl")


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / overlay)],
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (
        f"kubectl kustomize {overlay}: {result.stderr}\n(kustomize of kubectl "
        f"{_kubectl_version()}; the manifests need kustomize v5: components, labels)"
    )
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _kubectl_version() -> str:
    out = subprocess.run(
        [kubectl(), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
        check=False,
    ).stdout
    with contextlib.suppress(ValueError):
        return str(json.loads(out).get("kustomizeVersion", "?"))
    return "?"


def one(docs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def gateway_container(docs: tuple[Obj, ...]) -> Obj:
    pod = one(docs, "Deployment", "buildkit-gateway")["spec"]["template"]["spec"]
    container: Obj = next(c for c in pod["containers"] if c["name"] == "gateway")
    return container


def gateway_config(docs: tuple[Obj, ...]) -> Obj:
    """The YAML settings the gateway's --config names, from the ConfigMap mounted there."""
    text = mounted_files(docs)[config_path(docs)]
    data: Obj = yaml.safe_load(text)
    return data


def config_path(docs: tuple[Obj, ...]) -> str:
    args: list[str] = gateway_container(docs)["args"]
    return next(a.split("=", 1)[1] for a in args if a.startswith("--config="))


def mounted_files(docs: tuple[Obj, ...]) -> dict[str, str]:
    """path -> content of the gateway container's files that come from ConfigMaps."""
    pod = one(docs, "Deployment", "buildkit-gateway")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in gateway_container(docs)["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source:
            for key, text in one(docs, "ConfigMap", source["name"])["data"].items():
                files[f"{mount['mountPath']}/{key}"] = text
    return files


def pools(settings: Obj) -> list[Obj]:
    """The default pool's keys and each YAML pool's, as the config file holds them."""
    return [settings, *settings.get("pools", [])]


def buildkitd_workloads(docs: tuple[Obj, ...]) -> list[Obj]:
    return [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["metadata"]["labels"].get("app.kubernetes.io/name") == "buildkitd"
    ]


def test_every_overlay_renders_and_uses_only_existing_components() -> None:
    used_components = set()
    for overlay in OVERLAYS:
        docs = render(overlay)
        assert docs, overlay
        assert all(
            d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "buildkit-gateway"
            for d in docs
            if d["kind"] != "Namespace"
        ), overlay
        kustomization = yaml.safe_load((DEPLOY / overlay / "kustomization.yaml").read_text())
        for component in kustomization.get("components", []):
            used_components.add((DEPLOY / overlay / component).resolve())
    components = {p.parent.resolve() for p in (DEPLOY / "components").glob("*/kustomization.yaml")}
    assert components - used_components == set(), "components no overlay renders"
    assert (DEPLOY / "monitoring").resolve() in used_components


# ------------------------------------------------------------------------------- schemas


def test_every_object_is_valid_for_a_current_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes_validate

    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("kubernetes-validate tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # offline, and proven so
    versions = sorted({OLDEST_CURRENT, kubernetes_validate.latest_version()})
    assert versions[-1] >= OLDEST_CURRENT
    checked, problems = 0, []
    for overlay in OVERLAYS:
        for doc in render(overlay):
            kind = (doc["apiVersion"], doc["kind"])
            for version in versions:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                    checked += 1
                except kubernetes_validate.SchemaNotFoundError:
                    if kind not in NO_SCHEMA:
                        problems.append(f"{overlay}: no {version} schema for {kind}")
                except kubernetes_validate.ValidationError as exc:
                    problems.append(
                        f"{overlay}: {kind[1]} {doc['metadata']['name']} "
                        f"({version}): {exc.message} at {list(exc.path)}"
                    )
    assert not problems, "\n".join(problems)
    assert checked > 100


def test_the_validator_catches_a_misspelt_field() -> None:
    """The check above would notice a mistake (strict: unknown fields fail)."""
    import kubernetes_validate

    deployment = copy.deepcopy(one(render("base"), "Deployment", "buildkit-gateway"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_CURRENT, strict=True)


# ------------------------------------------------------------------------------- dry run


def _in_namespace(docs: tuple[Obj, ...], namespace: str) -> list[Obj]:
    """The namespaced objects moved to `namespace` (an overlay may name its own)."""
    moved = []
    for doc in copy.deepcopy(list(docs)):
        if doc["kind"] == "Namespace":
            continue
        doc["metadata"]["namespace"] = namespace
        for subject in doc.get("subjects") or ():
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace
        moved.append(doc)
    return moved


def _kubectl_apply(
    cluster: kube.KubeCluster, docs: list[Obj], namespace: str, *, dry_run: bool
) -> str:
    argv = [
        kubectl(),
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--context",
        "admin",
        "apply",
        "--server-side",
        "--field-manager",
        "test-deploy",
        "-n",
        namespace,
        "-f",
        "-",
    ]
    if dry_run:
        argv.append("--dry-run=server")
    result = subprocess.run(
        argv,
        input=yaml.safe_dump_all(docs),
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _served(cluster: kube.KubeCluster) -> set[tuple[str, str]]:
    result = subprocess.run(
        [
            kubectl(),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--context",
            "admin",
            "api-resources",
            "-o",
            "wide",
            "--no-headers=false",
        ],
        capture_output=True,
        text=True,
        timeout=KUBECTL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0]
    version_at, kind_at = header.index("APIVERSION"), header.index("KIND")
    served = set()
    for line in lines[1:]:
        api_version = line[version_at:].split()[0]
        kind = line[kind_at:].split()[0]
        served.add((api_version, kind))
    return served


async def test_server_side_dry_run_of_every_kind_the_test_cluster_serves(
    kube_cluster: kube.KubeCluster,
) -> None:
    served = await asyncio.to_thread(_served, kube_cluster)
    for kind in NOT_SERVED:
        assert kind not in served, f"the test cluster serves {kind} now: take it off NOT_SERVED"
    admin = await kube.api_client(kube_cluster)
    try:
        namespaces = {o: await kube.new_namespace(admin, "deploy") for o in OVERLAYS}
    finally:
        await admin.close()
    skipped: set[tuple[str, str]] = set()
    for overlay in OVERLAYS:
        docs = render(overlay)
        for doc in docs:
            kind = (doc["apiVersion"], doc["kind"])
            if kind in NOT_SERVED:
                skipped.add(kind)
            else:
                assert kind in served, f"{overlay}: the test cluster does not serve {kind}"
        wanted = [
            d
            for d in _in_namespace(docs, namespaces[overlay])
            if (d["apiVersion"], d["kind"]) not in NOT_SERVED
        ]
        wanted += [d for d in docs if d["kind"] == "Namespace"]
        out = await asyncio.to_thread(
            _kubectl_apply, kube_cluster, wanted, namespaces[overlay], dry_run=True
        )
        applied = out.count("serverside-applied (server dry run)")
        assert applied == len(wanted), (overlay, out)
    assert skipped == set(NOT_SERVED), "a kind skipped by name is in no manifest any more"


# ------------------------------------------------------------------------------- the gateway


def test_the_gateway_deployment_is_shaped_for_a_shared_builder() -> None:
    monitor = yaml.safe_load((DEPLOY / "monitoring" / "servicemonitor.yaml").read_text())
    for overlay in OVERLAYS:
        docs = render(overlay)
        deployment = one(docs, "Deployment", "buildkit-gateway")
        pod = deployment["spec"]["template"]
        spec = pod["spec"]
        container = gateway_container(docs)
        args = container["args"]
        flags = dict(a.removeprefix("--").split("=", 1) for a in args)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert deployment["spec"]["replicas"] == 2, overlay
        anti = spec["affinity"]["podAntiAffinity"]
        terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        assert terms[0]["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= (
            pod["metadata"]["labels"].items()
        )
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pdb["spec"]["minAvailable"] == 1
        # the Services select the gateway pods and name their ports; the admin port is the one
        # deploy/monitoring scrapes
        services = {
            d["metadata"]["name"]: d
            for d in docs
            if d["kind"] == "Service" and d["metadata"]["name"].startswith("buildkit-gateway")
        }
        for service in services.values():
            assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, (overlay, port)
        admin = services["buildkit-gateway-admin"]
        assert (
            [p["name"] for p in admin["spec"]["ports"]]
            == [monitor["spec"]["endpoints"][0]["port"]]
            == ["admin"]
        )
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            admin["metadata"]["labels"].items()
        )
        assert "admin" not in {p["name"] for p in services["buildkit-gateway"]["spec"]["ports"]}
        # listeners on the declared ports; probes on the admin port
        assert flags["listen"] == f"tcp://0.0.0.0:{ports['buildkit']}"
        assert flags["admin-listen"] == f"0.0.0.0:{ports['admin']}"
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        # draining: the grace period covers the preStop pause and --shutdown-grace
        pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
        grace = config.parse_duration(flags["shutdown-grace"])
        assert spec["terminationGracePeriodSeconds"] >= pause + grace + 10
        # identity, rights, resources, a non-root read-only container
        assert {
            "name": "POD_NAME",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
        } in container["env"]
        account = spec["serviceAccountName"]
        binding = one(docs, "RoleBinding", "buildkit-gateway")
        assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [
            ("ServiceAccount", account)
        ]
        assert binding["roleRef"]["name"] == one(docs, "Role")["metadata"]["name"]
        one(docs, "ServiceAccount", account)
        assert (
            set(container["resources"]["requests"])
            == set(container["resources"]["limits"])
            == {"cpu", "memory"}
        )
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        # the settings file is the ConfigMap, and parses
        assert config_path(docs) in mounted_files(docs)
        assert gateway_config(docs)


SCALE = {"Deployment": "deployments/scale", "StatefulSet": "statefulsets/scale"}


def scaled_workloads(settings: Obj) -> set[tuple[str, str]]:
    """(kind, name) of the workloads the settings file has the gateway discover and scale."""
    found = set()
    for pool in pools(settings):
        if pool.get("kube-deployment"):
            found.add(("Deployment", pool["kube-deployment"]))
        if pool.get("kube-statefulset"):
            found.add(("StatefulSet", pool["kube-statefulset"]))
    return found


def test_the_buildkitd_pools_are_what_the_gateway_configuration_names() -> None:
    for overlay in OVERLAYS:
        docs = render(overlay)
        settings = gateway_config(docs)
        workloads = {(d["kind"], d["metadata"]["name"]): d for d in buildkitd_workloads(docs)}
        assert scaled_workloads(settings) == set(workloads), overlay
        assert all(
            pool.get("max-replicas", settings.get("max-replicas")) for pool in pools(settings)
        ), f"{overlay}: every pool autoscaled"
        for (kind, name), workload in workloads.items():
            spec = workload["spec"]["template"]["spec"]
            container = next(c for c in spec["containers"] if c["name"] == "buildkitd")
            port_name = next(
                p.get("kube-port", settings.get("kube-port"))
                for p in pools(settings)
                if name in (p.get("kube-deployment"), p.get("kube-statefulset"))
            )
            port = next(p["containerPort"] for p in container["ports"] if p["name"] == port_name)
            assert f"--addr=tcp://0.0.0.0:{port}" in container["args"], (overlay, name)
            probe = container["readinessProbe"]["exec"]["command"]
            assert probe[0] == "buildctl" and probe[-2:] == ["debug", "workers"]
            assert spec["terminationGracePeriodSeconds"] >= 600
            assert "replicas" not in workload["spec"], (
                f"{overlay}: the gateway sets the {kind}'s count: `kubectl apply` must not"
            )
        # the Role lets the gateway scale exactly the workloads it is configured to scale
        rules = one(docs, "Role")["rules"]
        names = {
            (kind, n)
            for r in rules
            for kind, resource in SCALE.items()
            if resource in r["resources"]
            for n in r.get("resourceNames", [])
        }
        assert names == set(workloads), overlay
        assert all(
            r.get("resourceNames") for r in rules if set(SCALE.values()) & set(r["resources"])
        )


def test_the_statefulset_keeps_the_pool_template_and_a_volume_per_replica() -> None:
    base = one(render("base"), "Deployment", "buildkitd")["spec"]["template"]
    statefulset = one(render("overlays/statefulset"), "StatefulSet", "buildkitd")
    template = copy.deepcopy(statefulset["spec"]["template"])
    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["state"]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = template["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "state", "mountPath": "/var/lib/buildkit"} in mounts
    expected = copy.deepcopy(base)
    expected["spec"].pop("volumes")  # the state volume is the claim
    template["spec"].pop("volumes", None)
    assert template == expected, "the StatefulSet's pod template drifted from the base pool's"
    assert "buildkitd" not in {
        d["metadata"]["name"] for d in render("overlays/statefulset") if d["kind"] == "Deployment"
    }


# buildx Kubernetes driver option -> (overlay, a check of its rendered objects)
def _pool_spec(overlay: str, name: str = "buildkitd") -> Obj:
    docs = render(overlay)
    workload = next(d for d in buildkitd_workloads(docs) if d["metadata"]["name"] == name)
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def _pool_container(overlay: str) -> Obj:
    container: Obj = _pool_spec(overlay)["containers"][0]
    return container


def _pool_meta(overlay: str) -> tuple[Obj, Obj]:
    workload = buildkitd_workloads(render(overlay))[0]
    return workload["metadata"], workload["spec"]["template"]["metadata"]


def _env(overlay: str) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in gateway_container(render(overlay))["env"]}


DRIVER_OPTIONS: dict[str, Any] = {
    "namespace": lambda: all(
        d["metadata"].get("namespace") == "buildkit"
        for d in render("overlays/all-options")
        if d["kind"] != "Namespace"
    ),
    "image": lambda: _pool_container("overlays/all-options")["image"].startswith("moby/buildkit:"),
    "replicas": lambda: (
        _env("overlays/all-options")["BUILDKIT_GATEWAY_MIN_REPLICAS"]
        == _env("overlays/all-options")["BUILDKIT_GATEWAY_MAX_REPLICAS"]
    ),
    "requests.cpu": lambda: (
        "cpu" in _pool_container("overlays/all-options")["resources"]["requests"]
    ),
    "requests.memory": lambda: (
        "memory" in _pool_container("overlays/all-options")["resources"]["requests"]
    ),
    "requests.ephemeral-storage": lambda: (
        "ephemeral-storage" in _pool_container("overlays/all-options")["resources"]["requests"]
    ),
    "limits.cpu": lambda: "cpu" in _pool_container("overlays/all-options")["resources"]["limits"],
    "limits.memory": lambda: (
        "memory" in _pool_container("overlays/all-options")["resources"]["limits"]
    ),
    "limits.ephemeral-storage": lambda: (
        "ephemeral-storage" in _pool_container("overlays/all-options")["resources"]["limits"]
    ),
    "nodeselector": lambda: bool(_pool_spec("overlays/all-options")["nodeSelector"]),
    "tolerations": lambda: bool(_pool_spec("overlays/all-options")["tolerations"]),
    "schedulername": lambda: bool(_pool_spec("overlays/all-options")["schedulerName"]),
    "serviceaccount": lambda: (
        _pool_spec("overlays/all-options")["serviceAccountName"] == "buildkitd"
    ),
    "annotations": lambda: all(
        "example.com/owner" in m.get("annotations", {}) for m in _pool_meta("overlays/all-options")
    ),
    "labels": lambda: all(
        m["labels"].get("example.com/team") == "platform"
        for m in _pool_meta("overlays/all-options")
    ),
    "buildkitd-config": lambda: (
        "--config=/etc/buildkit/buildkitd.toml" in _pool_container("overlays/all-options")["args"]
    ),
    "rootless": lambda: (
        _pool_container("overlays/rootless")["image"].endswith("-rootless")
        and "privileged" not in _pool_container("overlays/rootless")["securityContext"]
        and _pool_container("overlays/rootless")["securityContext"]["seccompProfile"]["type"]
        == "Unconfined"
        and "--oci-worker-no-process-sandbox" in _pool_container("overlays/rootless")["args"]
        and _pool_meta("overlays/rootless")[1]["annotations"][
            "container.apparmor.security.beta.kubernetes.io/buildkitd"
        ]
        == "unconfined"
    ),
    "qemu.install": lambda: any(
        c["image"].startswith("tonistiigi/binfmt")
        and c["args"] == ["--install", "all"]
        and c["securityContext"]["privileged"]
        for c in _pool_spec("overlays/qemu")["initContainers"]
    ),
    "multi-platform (one pool per kubernetes.io/arch)": lambda: (
        {
            _pool_spec("overlays/multi-platform", n)["nodeSelector"]["kubernetes.io/arch"]
            for n in ("buildkitd", "buildkitd-arm64")
        }
        == {"amd64", "arm64"}
        and [
            p.get("kube-deployment")
            for p in pools(gateway_config(render("overlays/multi-platform")))
        ]
        == ["buildkitd", "buildkitd-arm64"]
    ),
    "statefulset (a cache volume per replica)": lambda: bool(
        one(render("overlays/statefulset"), "StatefulSet")["spec"]["volumeClaimTemplates"]
    ),
    "tls (listener)": lambda: (
        {"--tlscert", "--tlskey", "--tlscacert"}
        <= {a.split("=")[0] for a in gateway_container(render("overlays/tls"))["args"]}
    ),
    "tls (toward buildkitd)": lambda: (
        {"--tlscert", "--tlskey", "--tlscacert"}
        <= {a.split("=")[0] for a in _pool_container("overlays/replica-tls")["args"]}
        and {"--replica-tlscacert", "--replica-tlscert", "--replica-tlskey"}
        <= {a.split("=")[0] for a in gateway_container(render("overlays/replica-tls"))["args"]}
    ),
}


@pytest.mark.parametrize("option", sorted(DRIVER_OPTIONS))
def test_every_buildx_driver_option_has_its_place(option: str) -> None:
    assert DRIVER_OPTIONS[option](), option


# ------------------------------------------------------------------------------- RBAC

_GROUPS = {
    "pods": "",
    "deployments/scale": "apps",
    "statefulsets/scale": "apps",
    "leases": "coordination.k8s.io",
}
_CALL = re.compile(r"^(read|list|create|replace|patch|delete)_namespaced_([a-z_]+)$")


def code_api_calls() -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of every Kubernetes API call in gateway/, from the source:
    kubernetes_asyncio's `<verb>_namespaced_<resource>` methods (a list with watch=True is a
    watch; read is get, replace is update)."""
    calls = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name = node.func.attr
            assert "_for_all_namespaces" not in name, f"{path}: {name} needs a ClusterRole"
            m = _CALL.match(name)
            if not m:
                continue
            verb = {"read": "get", "replace": "update"}.get(m.group(1), m.group(1))
            if any(k.arg == "watch" for k in node.keywords):
                verb = "watch"
            *kind, last = m.group(2).split("_")
            resource = (
                f"{''.join(kind)}s/{last}"
                if kind and last in ("scale", "status")
                else f"{m.group(2).replace('_', '')}s"
            )
            assert resource in _GROUPS, f"{path}: {name}: add {resource}'s API group here"
            calls.add((_GROUPS[resource], resource, verb))
    return calls


def granted(role: Obj) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def needed(settings: Obj, calls: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """The calls a gateway with these settings can make: the scale of the kinds it scales;
    pods: patch only for a Deployment (pod-deletion-cost; a StatefulSet sheds its highest
    ordinals)."""
    kinds = {kind for kind, _name in scaled_workloads(settings)}
    unused = {SCALE[kind] for kind in SCALE if kind not in kinds}
    if "Deployment" not in kinds:
        unused.add("pods/patch")
    return {c for c in calls if c[1] not in unused and f"{c[1]}/{c[2]}" not in unused}


def test_the_role_grants_exactly_the_calls_the_code_makes() -> None:
    """Least privilege, read from the source: every call the gateway's code makes is granted
    (in the overlays whose settings lead to it), nothing else is."""
    calls = code_api_calls()
    assert ("coordination.k8s.io", "leases", "update") in calls  # the scan sees the Leases
    assert ("", "pods", "watch") in calls and ("apps", "statefulsets/scale", "patch") in calls
    covered = set()
    for overlay in OVERLAYS:
        docs = render(overlay)
        role, want = granted(one(docs, "Role")), needed(gateway_config(docs), calls)
        assert role == want, (
            f"{overlay}: granted, never used: {sorted(role - want)}; "
            f"used, not granted: {sorted(want - role)}"
        )
        covered |= role
    assert covered == calls, f"no overlay grants {sorted(calls - covered)}"


# ------------------------------------------------------------------------------- start it


class Pki:
    """One throw-away CA for the listener, the clients, buildkitd and the gateway's client
    certificate toward buildkitd, and the Secrets' files made from it."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.listener = self.ca.issue_cert("buildkit-gateway", "127.0.0.1")
        self.toward_replicas = self.ca.issue_cert("buildkit-gateway")
        self.buildkitd = self.ca.issue_cert("buildkitd")  # components/replica-tls: one name

    def secret(self, name: str) -> dict[str, bytes]:
        """The keys of the Secrets the overlays mount (their comments say how to make them)."""
        cert = {
            "buildkit-gateway-tls": self.listener,
            "buildkit-gateway-replica-tls": self.toward_replicas,
            "buildkitd-tls": self.buildkitd,
        }[name]
        return {
            "tls.crt": b"".join(p.bytes() for p in cert.cert_chain_pems),
            "tls.key": cert.private_key_pem.bytes(),
            "ca.crt": self.ca.cert_pem.bytes(),
        }

    def replica_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.buildkitd.private_key_pem.bytes(), self.buildkitd.cert_chain_pems[0].bytes())],
            root_certificates=self.ca.cert_pem.bytes(),
            require_client_auth=True,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pod_arguments(
    docs: tuple[Obj, ...],
    files: Path,
    pki: Pki,
) -> tuple[list[str], dict[str, str], dict[int, int]]:
    """The gateway container's args and env as its pod gets them, with its volumes written
    under `files` and its listening addresses moved to free loopback ports; also the port map
    (container port -> loopback port)."""
    deployment = one(docs, "Deployment", "buildkit-gateway")
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        where = files / mount["name"]
        where.mkdir()
        if "configMap" in volume:
            for key, text in one(docs, "ConfigMap", volume["configMap"]["name"])["data"].items():
                (where / key).write_text(text)
        elif "secret" in volume:
            for key, data in pki.secret(volume["secret"]["secretName"]).items():
                (where / key).write_bytes(data)
        else:
            assert "emptyDir" in volume, volume
        paths[mount["mountPath"]] = where
    declared = {p["containerPort"] for p in container["ports"]}
    ports = {port: free_port() for port in declared}

    def loopback(text: str) -> str:
        def move(m: re.Match[str]) -> str:
            port = int(m.group(1))
            assert port in ports, f"listens on {port}, which the container does not declare"
            return f"127.0.0.1:{ports[port]}"

        return re.sub(r"0\.0\.0\.0:(\d+)", move, text)

    def local(arg: str) -> str:
        flag, _, value = arg.partition("=")
        if value.startswith("/"):
            mount = next((m for m in paths if value.startswith(m + "/")), None)
            assert mount is not None, f"{arg}: not in a mounted volume"
            value = str(paths[mount]) + value[len(mount) :]
        return f"{flag}={loopback(value)}" if value else arg

    for path in files.rglob("*.yaml"):  # the settings file's own listeners (pools)
        path.write_text(loopback(path.read_text()))
    args = [local(a) for a in container["args"]]
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, var
            env[var["name"]] = "buildkit-gateway-5d4f8b7c9-x2x7q"
    return args, env, ports


@contextlib.asynccontextmanager
async def pool_pods(
    cluster: kube.KubeCluster, namespace: str, docs: tuple[Obj, ...], pki: Pki
) -> AsyncIterator[list[FakeReplica]]:
    """The rendered buildkitd workloads applied for real, and one Running, Ready pod of each,
    made from its pod template (the test plays the controllers and the kubelet): a fake
    replica listens on the port the template names `buildkitd`, speaking TLS when buildkitd's
    arguments ask for it."""
    workloads = buildkitd_workloads(docs)
    await asyncio.to_thread(
        _kubectl_apply,
        cluster,
        _in_namespace(tuple(workloads), namespace),
        namespace,
        dry_run=False,
    )
    admin = await kube.api_client(cluster)
    replicas = []
    try:
        core = client.CoreV1Api(admin)
        for workload in workloads:
            template = copy.deepcopy(workload["spec"]["template"])
            container = template["spec"]["containers"][0]
            tls = any(a.startswith("--tlscert=") for a in container["args"])
            replica = FakeReplica(workload["metadata"]["name"] + "-0")
            port = free_port()
            await replica.start("127.0.0.1", port, tls=pki.replica_credentials() if tls else None)
            replicas.append(replica)
            for declared in container["ports"]:
                if declared["name"] == "buildkitd":
                    declared["containerPort"] = port  # the fake's port, by the same name
            name = f"{workload['metadata']['name']}-0"
            for claim in workload["spec"].get("volumeClaimTemplates", []):  # as a StatefulSet
                template["spec"].setdefault("volumes", []).append(
                    {  # controller makes them
                        "name": claim["metadata"]["name"],
                        "persistentVolumeClaim": {
                            "claimName": f"{claim['metadata']['name']}-{name}"
                        },
                    }
                )
            await kube._call(
                core.create_namespaced_pod,
                namespace,
                {
                    "metadata": {"name": name, **template["metadata"]},
                    "spec": {**template["spec"], "nodeName": kube.NODE},
                },
            )
            await kube._call(
                core.patch_namespaced_pod_status,
                name,
                namespace,
                {
                    "status": {
                        "phase": "Running",
                        "podIP": "127.0.0.1",
                        "podIPs": [{"ip": "127.0.0.1"}],
                        "conditions": [
                            kube._condition("PodScheduled", True),
                            *kube._readiness(True),
                        ],
                    }
                },
            )
        yield replicas
    finally:
        await admin.close()
        for replica in replicas:
            await replica.stop(grace=0)


@contextlib.contextmanager
def pod_environment(env: dict[str, str]) -> Iterator[None]:
    """The container's environment in os.environ too (the gateway reads POD_NAME there)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def wait_ready(gw: Gateway, task: asyncio.Task[None], pool_names: list[str]) -> None:
    """Until the gateway has started and every pool has a replica that takes builds."""
    changed = asyncio.Event()
    gw.registry.subscribe(lambda _snapshot: changed.set())
    async with asyncio.timeout(START_TIMEOUT):
        started = asyncio.ensure_future(gw.started.wait())
        done, _ = await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises the start-up error
        while not all(gw.registry.snapshot.placeable(p) for p in pool_names):
            changed.clear()
            await changed.wait()


@pytest.mark.parametrize(
    "overlay",
    [
        "base",
        "overlays/all-options",
        "overlays/multi-platform",
        "overlays/statefulset",
        "overlays/replica-tls",
    ],
)
async def test_the_gateway_starts_with_the_rendered_arguments_and_turns_ready(
    overlay: str, kube_cluster: kube.KubeCluster, tmp_path: Path
) -> None:
    docs = render(overlay)
    pki = Pki()
    args, env, ports = pod_arguments(docs, tmp_path, pki)
    settings = config.load(args, env)  # exactly the pod's arguments and environment
    admin = await kube.api_client(kube_cluster)
    try:
        namespace = await kube.new_namespace(admin, "deploy")
    finally:
        await admin.close()
    rbac = [
        d
        for d in _in_namespace(docs, namespace)
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")
    ]
    for doc in rbac:  # also bound to the user whose token the test's "pod" carries
        if doc["kind"] == "RoleBinding":
            doc["subjects"].append(
                {"kind": "User", "name": "gateway", "apiGroup": "rbac.authorization.k8s.io"}
            )
    await kube.apply_rbac(kube_cluster, namespace, yaml.safe_dump_all(rbac))
    assert settings.admin.listen is not None
    admin_port = settings.admin.listen[1]
    assert admin_port == ports[9180]
    async with pool_pods(kube_cluster, namespace, docs, pki):
        with in_cluster_files(kube_cluster, namespace), pod_environment(env):
            gw = Gateway(settings)
            task = asyncio.create_task(gw.run(), name=f"gateway of {overlay}")
            try:
                await wait_ready(gw, task, [p.name for p in settings.pools])
                async with aiohttp.ClientSession() as session:
                    for path, status in (("/healthz", 200), ("/readyz", 200)):
                        async with session.get(f"http://127.0.0.1:{admin_port}{path}") as resp:
                            assert resp.status == status, (path, await resp.text())
                # every pool takes builds on the pod of its own workload
                placed = {p.name: gw.registry.snapshot.placeable(p.name) for p in settings.pools}
                assert placed == {
                    p.name: (f"{p.kube.name}-0",) for p in settings.pools if p.kube is not None
                }
                listening = {ep.port for ep in gw.listening}
                assert set(ports.values()) - {admin_port} <= listening
                assert gw.watches.keys() == {p.name for p in settings.pools}
            finally:
                gw.stop.set()
                async with asyncio.timeout(20):
                    await task
    asked, refused = await asyncio.to_thread(used, kube_cluster, namespace, set(), timeout=0)
    assert ("list", "pods") in asked and ("watch", "pods") in asked
    assert not refused, f"the overlay's Role refused: {refused}"


# ------------------------------------------------------------------------------- the image


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuations joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


def _dockerignore_admits(path: str) -> bool:
    """Whether the build context holds `path` (.dockerignore: the last matching pattern wins;
    a pattern matches a path or any of its parents)."""
    admitted = True
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, c) for c in candidates):
            admitted = negate
    return admitted


def test_the_dockerfile_copies_existing_files_and_installs_the_readme_lock() -> None:
    instructions = _dockerfile()
    stages: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((word, rest))
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    copied = []
    for stage in stages:
        for word, rest in stage:
            if word in ("COPY", "ADD"):
                assert word == "COPY", "ADD fetches; COPY only"
                parts = [p for p in rest.split() if not p.startswith("--")]
                if "--from=" in rest:
                    continue
                for source in parts[:-1]:
                    assert (ROOT / source).exists(), f"COPY {source}: no such file"
                    assert _dockerignore_admits(source), f"COPY {source}: .dockerignore drops it"
                    copied.append(source)
    # every file the package needs is in the context (package data included)
    package = [f for f in tracked if f.startswith("gateway/")]
    assert package and all(_dockerignore_admits(f) for f in package), [
        f for f in package if not _dockerignore_admits(f)
    ]
    assert not _dockerignore_admits(".venv/bin/python") and not _dockerignore_admits(".git")
    # the lock of the README's install command, installed with nothing outside it
    readme = (ROOT / "README.md").read_text()
    install = readme.split("```")[1].splitlines()[1]
    lock = re.search(r"pip install -r (\S+)", install)
    assert lock, install
    assert lock.group(1) in copied
    build_runs = [rest for word, rest in stages[0] if word == "RUN"]
    installs = [r for r in build_runs if " install " in r]
    assert any(f"-r {lock.group(1)}" in r for r in installs), installs
    assert all("--no-deps" in r for r in installs), "everything comes from the lock"
    # the runtime stage: the environment from the build stage, nothing installed, non-root
    final = stages[-1]
    runs = " ".join(rest for word, rest in final if word == "RUN")
    assert not re.search(r"pip install|apt-get install|apk add|gcc|build-essential", runs)
    assert any(w == "COPY" and "--from=build" in r for w, r in final)
    user = next(rest for word, rest in final if word == "USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    entrypoint = json.loads(next(rest for word, rest in final if word == "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["buildkit-gateway"] and "buildkit-gateway" in scripts
    exposed = {int(p) for word, rest in final if word == "EXPOSE" for p in rest.split()}
    cmd = json.loads(next(rest for word, rest in final if word == "CMD"))
    settings = config.load(cmd, {})
    assert settings.admin.listen is not None
    assert exposed == {settings.listen.endpoints[0].port, settings.admin.listen[1]}
    container = gateway_container(render("base"))
    assert exposed == {p["containerPort"] for p in container["ports"]}
    assert container["image"].split(":")[0] == "buildkit-gateway"


# ------------------------------------------------------------------------------- the reference


def test_the_configuration_reference_is_generated_and_matches_help() -> None:
    generated = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "config_reference.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == generated.stdout, (
        "docs/configuration.md is stale: run hack/config-reference > docs/configuration.md"
    )
    help_text = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "COLUMNS": "1000"},
    ).stdout
    entries = re.findall(
        r"^  (--[a-z-]+)(?: ([A-Z:_]+))?\s+(.*?)(?: \[env (\w+)\] \(default: (.*)\))?$",
        help_text,
        re.M,
    )
    flags = {flag for flag, *_ in entries}
    assert all(env for flag, _, _, env, _ in entries if flag not in ("--help", "--config"))
    assert len(flags) >= len(config.OPTIONS), help_text
    rows = {
        row.split("`")[1].split()[0]: row
        for row in committed.splitlines()
        if row.startswith("| `--")
    }
    for flag, _metavar, _text, env, default in entries:
        if flag == "--help":
            continue
        assert flag in rows, f"{flag} of --help is missing from docs/configuration.md"
        if env:
            assert f"`{env}`" in rows[flag], flag
        if default and default not in ("none", ""):
            assert f"`{default.split(', ')[0]}`" in rows[flag], (flag, default)
    assert set(rows) == flags - {"--help"}, "documented options that --help does not know"


def test_the_readme_names_only_deploy_paths_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\bdeploy/[\w./-]*[\w/]", readme))
    assert {"deploy/base", "deploy/overlays/tls", "deploy/overlays/multi-platform"} <= {
        n.rstrip("/") for n in named
    }
    missing = [n for n in sorted(named) if not (ROOT / n).exists()]
    assert not missing, missing
    assert "docs/configuration.md" in readme
