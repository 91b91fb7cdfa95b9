"""Settings: one frozen dataclass per concern, every field documented, validated once.

Design: each option is declared once in `OPTIONS` (flag, environment variable, YAML key, type,
default, help). `load(argv, environ)` merges the sources with the precedence flag > environment
variable (`BUILDKIT_GATEWAY_<NAME>`) > YAML file (`--config`) > default, converts and validates
every value, and returns `Settings` or raises `ConfigError` naming the option and the source.
Nothing else in the gateway reads flags, the environment or the file.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "BUILDKIT_GATEWAY_"
MIN_STREAM_WINDOW = (16 << 20) + 5  # BuildKit's largest message plus its gRPC prefix


class ConfigError(ValueError):
    """Invalid configuration; the message names the option and where it came from."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed tcp://host:port or unix:///path address."""

    scheme: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def name(self) -> str:
        """Stable identity: host:port, or the socket path."""
        return self.path if self.scheme == "unix" else f"{self.host}:{self.port}"


_TCP = re.compile(r"^tcp://(\[[^\]]+\]|[^:/\[\]]+):(\d{1,5})/?$")


def parse_endpoint(text: str) -> Endpoint:
    if not isinstance(text, str):
        raise ValueError(f"expected tcp://HOST:PORT or unix:///PATH, got {text!r}")
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"unix address needs an absolute path: {text!r}")
        return Endpoint("unix", path=path)
    m = _TCP.match(text)
    if not m:
        raise ValueError(f"expected tcp://HOST:PORT or unix:///PATH, got {text!r}")
    port = int(m.group(2))
    if not 0 <= port < 65536:  # 0: any free port (tests, benchmarks)
        raise ValueError(f"port out of range in {text!r}")
    return Endpoint("tcp", host=m.group(1).strip("[]"), port=port)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")


def parse_duration(text: str | float | int) -> float:
    """Seconds from "250ms", "5s", "2m", "1h" or a bare number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _DURATION.match(str(text).strip())
        if not m:
            raise ValueError(f"expected a duration like 500ms, 5s, 2m; got {text!r}")
        value = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if value < 0:
        raise ValueError("duration must not be negative")
    return value


# ---- settings, one dataclass per concern ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenSettings:
    endpoints: tuple[Endpoint, ...]
    """Client endpoints (tcp:// or unix://) that accept BuildKit gRPC connections."""


@dataclass(frozen=True, slots=True)
class KubeWorkload:
    """Where a pool's replicas come from in Kubernetes (discovery/)."""

    namespace: str
    """Namespace of the pods and the workload; empty: the gateway's own (in a pod), else the
    kubeconfig context's, else "default"."""
    deployment: str
    """The buildkitd Deployment whose pods are the pool (its selector) and whose scale the
    scaler sets; empty with `selector` (discovery only)."""
    selector: str
    """Label selector of the pods; empty: the Deployment's own selector."""
    port: int | str
    """buildkitd's port in each pod: a number or a container port name."""
    statefulset: str = ""
    """A buildkitd StatefulSet instead of the Deployment: stable pod names, so each replica
    keeps its cache volume and its place on the ring across restarts and scale events;
    scale-down drains the highest ordinals and lowers the count once they are idle."""

    @property
    def kind(self) -> str:
        return "StatefulSet" if self.statefulset else "Deployment"

    @property
    def name(self) -> str:
        """The scaled workload's name ("" for discovery by selector alone)."""
        return self.statefulset or self.deployment


@dataclass(frozen=True, slots=True)
class ScalingSettings:
    """Autoscaling of a pool's Deployment from its builds (scaling/); on when max_replicas > 0."""

    min_replicas: int
    """Fewest replicas, also when idle (0: scale to zero)."""
    max_replicas: int
    """Most replicas."""
    target_builds: int
    """Running + queued builds one replica should carry: desired = ceil(builds / this)."""
    down_window: float
    """Seconds demand must stay lower before the count goes down (the HPA's stabilization)."""


@dataclass(frozen=True, slots=True)
class PoolSettings:
    name: str
    """Pool name ("default" for the one configured by the top-level options)."""
    replicas: tuple[Endpoint, ...]
    """Static buildkitd replicas of the pool."""
    loadbalance: str
    """"sticky" (consistent hashing on the build's context) or "random" (two choices)."""
    load_factor: float
    """Bounded loads: skip a replica above load_factor x the average active builds."""
    max_builds: int
    """Concurrent non-internal builds per replica; 0 means no limit (nothing queues)."""
    max_queue: int
    """Builds that may wait for a slot in this pool; one more is refused."""
    queue_timeout: float
    """Seconds a build may wait for a slot before it is refused."""
    authorities: tuple[str, ...] = ()
    """:authority host names that select this pool (e.g. arm64.builders.example)."""
    listen: tuple[Endpoint, ...] = ()
    """Extra client endpoints whose connections all go to this pool."""
    tenant_max_builds: int = 0
    """Running builds one tenant (client certificate name, else address) may have in the pool;
    more wait in the queue. 0: no limit."""
    tenant_max_queue: int = 0
    """Builds one tenant may have waiting in the pool; one more is refused. 0: no limit."""
    allow: tuple[str, ...] = ()
    """Tenants allowed to use the pool; empty: every client."""
    kube: KubeWorkload | None = None
    """Pods discovered in Kubernetes instead of static replicas (None: static)."""
    scaling: ScalingSettings | None = None
    """Autoscaling of the pool's Deployment (None: off)."""


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    session_wait: float
    """Seconds a Solve waits for its Session (the sticky key) before using the fallback key."""
    hold_timeout: float
    """Seconds a Session/Status/LLBBridge call may wait for its build's Solve to be placed."""
    affinity_keys: int = 10_000
    """Sticky keys whose last replica the gateway remembers (cache affinity; 0: off)."""


@dataclass(frozen=True, slots=True)
class RelaySettings:
    stream_window: int
    """Flow-control window the gateway grants each client stream (bytes)."""
    connection_window: int
    """Connection window granted to each client: caps what one client makes the gateway buffer.
    Replica connections, shared by many builds, get the largest window (2^31-1)."""
    max_header_list: int
    """Largest decoded header list accepted from replicas (error trailers carry stack
    traces); also the hard bound of what a client's block may decode to."""
    max_client_streams: int
    """SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients."""
    max_connections: int = 10_000
    """Client connections the gateway keeps at once; one more is refused (GOAWAY)."""
    max_connections_per_client: int = 256
    """Client connections from one address at once."""
    handshake_timeout: float = 10.0
    """Seconds a client has for its HTTP/2 preface, and for finishing any header block."""
    idle_timeout: float = 1800.0
    """Seconds a client connection may have no call at all before it is closed (0: never)."""
    write_timeout: float = 60.0
    """Seconds a client may leave megabytes unread before it is dropped."""
    replica_stream_window: int = 1 << 20
    """Window the gateway grants each stream on a replica connection: the most it buffers for
    one stream whose client does not read (a download to a stalled client waits there)."""
    max_request_header_list: int = 64 << 10
    """Largest header list a client may send (decoded), advertised to clients; a larger one is
    refused with RESOURCE_EXHAUSTED, far below what a replica (grpc-go: 16 MiB) resets the
    shared connection for."""


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    interval: float
    """Seconds between probes (ListWorkers + Info) of each replica; also refreshes caches."""
    timeout: float
    """Seconds a probe may take before the replica counts as unreachable."""
    eject_backoff: float = 1.0
    """Seconds a replica stays ejected after its first connect failure or lost connection."""
    eject_backoff_max: float = 60.0
    """Upper bound of the ejection time, which doubles with each ejection in a row."""
    dead_after: float = 60.0
    """Seconds from a replica's first failed probe, with every probe since failed, after which
    the builds running on it (it vanished without closing: node lost, process frozen) end with
    UNAVAILABLE and it is ejected; 0: never, its builds wait for it to come back. Measured from
    the first failure seen, so one failed probe alone never ends builds."""


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """How to reach the Kubernetes API (used only if a pool is discovered there)."""

    kubeconfig: str
    """Path of a kubeconfig file; empty: in-cluster service account, else ~/.kube/config."""
    context: str
    """kubeconfig context; empty: its current context."""
    backoff: float = 0.5
    """First delay before retrying a failed API call or watch; doubles up to backoff_max."""
    backoff_max: float = 10.0
    """Longest delay between retries while the API is down."""
    lease: str = "buildkit-gateway"
    """Name of the coordination.k8s.io Lease whose holder is the one gateway that scales
    (several gateways, one scaler); each gateway also keeps a Lease `<lease>-<identity>` that
    publishes its demand. In the gateway's namespace."""
    lease_duration: float = 15.0
    """How long a Lease holds without renewal: a dead leader is replaced, and a dead gateway's
    demand forgotten, this long after their last renewal (renewed every fifth of it)."""
    identity: str = ""
    """This gateway among several (the Leases' holder); empty: $POD_NAME, else the host name
    and a random suffix."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS on the client listeners (tcp://), terminated by the gateway (relay/tls.py)."""

    cert: str
    """PEM certificate chain the gateway presents."""
    key: str
    """PEM private key of `cert`."""
    cacert: str
    """PEM CA bundle that client certificates must chain to; empty: no client certificates."""


@dataclass(frozen=True, slots=True)
class ReplicaTlsSettings:
    """TLS toward the replicas (buildkitd --tlscert/--tlskey/--tlscacert), for the relay, the
    probes and the control server's fan-out alike."""

    cacert: str
    """PEM CA bundle the replicas' certificates chain to; empty: the system's."""
    cert: str
    """PEM client certificate the gateway presents (buildkitd with --tlscacert wants one)."""
    key: str
    """PEM private key of `cert`."""
    servername: str
    """Name the replicas' certificates must carry; empty: each replica's host."""


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: tuple[str, int] | None
    """Host and port of the admin HTTP server (/metrics, /healthz, /readyz, /status), or None."""
    shutdown_grace: float
    """Seconds running builds may take to finish after SIGTERM before the gateway stops."""


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str
    """"text" or "json"."""
    level: str
    """debug, info, warning or error."""


@dataclass(frozen=True, slots=True)
class Settings:
    listen: ListenSettings
    pools: tuple[PoolSettings, ...]
    """The default pool first, then those of the YAML `pools` list."""
    routing: RoutingSettings
    relay: RelaySettings
    probe: ProbeSettings
    log: LogSettings
    admin: AdminSettings
    kube: KubeSettings = KubeSettings("", "")
    tls: TlsSettings | None = None
    """TLS on the client listeners; None: plain h2c."""
    replica_tls: ReplicaTlsSettings | None = None
    """TLS toward the replicas; None: plain h2c."""

    @property
    def pool(self) -> PoolSettings:
        """The default pool."""
        return self.pools[0]


# ---- option table --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option:
    flag: str
    help: str
    default: Any
    convert: Callable[[Any], Any] = str
    repeatable: bool = False
    metavar: str | None = None

    @property
    def key(self) -> str:
        """YAML key (the flag without dashes, dashes kept) and argparse dest base."""
        return self.flag.lstrip("-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace("-", "_")


def _choice(*allowed: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).lower()
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}; got {value!r}")
        return text

    return convert


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected a positive integer, got {value!r}")
    number = int(value)
    if number <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return number


def _stream_window(value: Any) -> int:
    number = _positive_int(value)
    if number < MIN_STREAM_WINDOW:
        raise ValueError(f"expected at least {MIN_STREAM_WINDOW} (a 16 MiB request message "
                         f"and its 5-byte gRPC prefix), got {value!r}")
    return number


def _replica_window(value: Any) -> int:
    number = _positive_int(value)
    if not 1 << 16 <= number <= 2**31 - 1:
        raise ValueError(f"expected 65536 to 2147483647 bytes, got {value!r}")
    return number


def _host_port(value: Any) -> tuple[str, int] | None:
    text = str(value).strip()
    if not text:
        return None
    m = re.fullmatch(r"(\[[^\]]+\]|[^:\[\]]*):(\d{1,5})", text)
    if not m or int(m.group(2)) > 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return m.group(1).strip("[]") or "0.0.0.0", int(m.group(2))


def _count(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected a whole number, got {value!r}")
    number = int(value)
    if number < 0:
        raise ValueError(f"expected a whole number of at least 0, got {value!r}")
    return number


def _kube_port(value: Any) -> int | str:
    text = str(value).strip()
    if text.isdigit():
        if not 0 < int(text) < 65536:
            raise ValueError(f"port out of range: {value!r}")
        return int(text)
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", text):
        raise ValueError(f"expected a port number or a container port name, got {value!r}")
    return text


def _name(value: Any) -> str:
    """A Kubernetes object name (DNS-1123 subdomain), or empty."""
    text = str(value).strip()
    if text and not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", text):
        raise ValueError(f"expected a Kubernetes name (lower-case, digits, '-', '.'), "
                         f"got {value!r}")
    return text


def _load_factor(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number of at least 1, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 1:
        raise ValueError(f"expected a finite number of at least 1, got {value!r}")
    return number


OPTIONS: tuple[Option, ...] = (
    Option("--listen", "client endpoint, tcp://HOST:PORT or unix:///PATH (repeatable)",
           ["tcp://127.0.0.1:1234"], parse_endpoint, True, "ADDR"),
    Option("--tlscert", "PEM certificate for TLS on the client listeners (with --tlskey)", "",
           str, metavar="FILE"),
    Option("--tlskey", "PEM private key of --tlscert", "", str, metavar="FILE"),
    Option("--tlscacert", "PEM CA bundle: client certificates are then required and "
           "verified, and name the client", "", str, metavar="FILE"),
    Option("--replica-tlscacert", "PEM CA bundle the replicas' certificates chain to (turns "
           "TLS toward replicas on)", "", str, metavar="FILE"),
    Option("--replica-tlscert", "PEM client certificate presented to replicas (with "
           "--replica-tlskey; turns TLS toward replicas on)", "", str, metavar="FILE"),
    Option("--replica-tlskey", "PEM private key of --replica-tlscert", "", str,
           metavar="FILE"),
    Option("--replica-servername", "name the replicas' certificates must carry (default: each "
           "replica's host)", "", str, metavar="NAME"),
    Option("--replica", "static buildkitd replica of the default pool, tcp://HOST:PORT "
           "(repeatable)", [], parse_endpoint, True, "ADDR"),
    Option("--loadbalance", "placement policy: sticky (consistent hashing, warm caches) or "
           "random", "sticky", _choice("sticky", "random")),
    Option("--load-factor", "bounded loads: a replica above this x the average active builds "
           "is skipped for the next on the ring (at least 1)", 1.25, _load_factor),
    Option("--max-builds", "concurrent builds per replica (internal probe builds excluded); "
           "0 means no limit", 0, _count),
    Option("--max-queue", "builds that may wait for a free replica; one more is refused "
           "with RESOURCE_EXHAUSTED", 1000, _count),
    Option("--queue-timeout", "how long a build may wait for a free replica before it is "
           "refused with RESOURCE_EXHAUSTED", "30m", parse_duration, metavar="DUR"),
    Option("--tenant-max-builds", "running builds one client (its certificate name, else "
           "its address) may have in a pool; more wait in the queue; 0: no limit", 0, _count),
    Option("--tenant-max-queue", "builds one client may have waiting in a pool; one more is "
           "refused with RESOURCE_EXHAUSTED; 0: no limit", 0, _count),
    Option("--allow", "client allowed to build in the default pool (certificate name, or "
           "address without mTLS; repeatable); none given: every client", [], str, True,
           "CLIENT"),
    Option("--session-wait", "how long a Solve waits for its Session to learn its sticky key",
           "1s", parse_duration, metavar="DUR"),
    Option("--affinity-keys", "sticky keys whose last replica is remembered: a key goes back "
           "to the replica that holds its cache while that one takes builds, even after the "
           "ring changed (0: off, the ring alone)", 10_000, _count),
    Option("--hold-timeout", "how long a call may wait for its build's Solve before it is "
           "routed by fallback", "1s", parse_duration, metavar="DUR"),
    Option("--stream-window", "flow-control window granted per client stream, bytes; at least "
           "16 MiB + 5 so that a held request message of BuildKit's maximum size fits",
           17 << 20, _stream_window),
    Option("--connection-window", "flow-control window per client connection, bytes (caps "
           "what one client makes the gateway buffer)",
           256 << 20, _positive_int),
    Option("--max-connections", "client connections kept at once; one more is refused",
           10_000, _positive_int),
    Option("--max-connections-per-client", "client connections from one address at once",
           256, _positive_int),
    Option("--handshake-timeout", "time a client has for its HTTP/2 preface, and for "
           "finishing a header block", "10s", parse_duration, metavar="DUR"),
    Option("--client-idle-timeout", "a client connection with no call for this long is "
           "closed; 0 never", "30m", parse_duration, metavar="DUR"),
    Option("--client-write-timeout", "a client that leaves megabytes unread this long is "
           "dropped", "60s", parse_duration, metavar="DUR"),
    Option("--replica-stream-window", "flow-control window per stream toward a replica, "
           "bytes: the most the gateway buffers for a stream whose client does not read",
           1 << 20, _replica_window),
    Option("--max-header-list", "largest header list accepted from replicas (error trailers "
           "carry stack traces), bytes", 16 << 20, _positive_int),
    Option("--max-request-header-list", "largest header list a client may send, bytes; a "
           "larger request is refused with RESOURCE_EXHAUSTED", 64 << 10, _positive_int),
    Option("--max-client-streams", "concurrent streams allowed per client connection", 1000,
           _positive_int),
    Option("--probe-interval", "time between probes of each replica", "5s", parse_duration,
           metavar="DUR"),
    Option("--probe-timeout", "time a probe may take", "3s", parse_duration, metavar="DUR"),
    Option("--eject-backoff", "how long a replica that could not be reached takes no new "
           "builds (doubles with each ejection in a row)", "1s", parse_duration,
           metavar="DUR"),
    Option("--eject-backoff-max", "upper bound of the ejection time", "60s", parse_duration,
           metavar="DUR"),
    Option("--replica-dead-after", "how long a replica's probes may go on failing, from the "
           "first failure, while builds run on it before those builds end with UNAVAILABLE (a "
           "replica gone without closing its connections); 0: never", "60s", parse_duration,
           metavar="DUR"),
    Option("--kubeconfig", "kubeconfig file for the Kubernetes API; empty: the in-cluster "
           "service account, else ~/.kube/config", "", str, metavar="PATH"),
    Option("--kube-context", "kubeconfig context; empty: its current one", "", str,
           metavar="NAME"),
    Option("--kube-lease", "name of the Lease that elects the one gateway that scales (the "
           "others publish their demand to it in Leases <name>-<identity>)",
           "buildkit-gateway", _name, metavar="NAME"),
    Option("--kube-lease-duration", "how long a Lease holds unrenewed: a dead scaler is "
           "replaced and a dead gateway's demand dropped this long after its last renewal",
           "15s", parse_duration, metavar="DUR"),
    Option("--identity", "this gateway's name among several (the Leases' holder); empty: "
           "$POD_NAME, else the host name and a random suffix", "", str, metavar="NAME"),
    Option("--kube-namespace", "namespace of the buildkitd pods; empty: the gateway's own "
           "(in a pod), else the kubeconfig context's, else default", "", _name, metavar="NS"),
    Option("--kube-deployment", "discover the pods of this buildkitd Deployment (and scale "
           "it with --max-replicas) instead of static --replica addresses", "", _name,
           metavar="NAME"),
    Option("--kube-statefulset", "discover (and scale) the pods of this buildkitd StatefulSet "
           "instead of a Deployment: stable pod names keep each replica's cache volume and "
           "ring place; scale-down drains the highest ordinals first", "", _name,
           metavar="NAME"),
    Option("--kube-selector", "label selector of the buildkitd pods (default: the "
           "Deployment's); alone, discovery without scaling", "", str, metavar="SEL"),
    Option("--kube-port", "buildkitd's port in each pod: a number or a container port name",
           "1234", _kube_port, metavar="PORT"),
    Option("--min-replicas", "autoscaling: fewest replicas (0 scales to zero when idle)", 0,
           _count),
    Option("--max-replicas", "autoscaling: most replicas; setting it turns autoscaling of "
           "--kube-deployment on", 0, _count),
    Option("--target-builds", "autoscaling: running + queued builds per replica, desired = "
           "ceil(builds / this); 0: --max-builds, or 1 without it", 0, _count),
    Option("--scale-down-window", "autoscaling: how long demand must stay lower before "
           "replicas are removed (idle ones only)", "5m", parse_duration, metavar="DUR"),
    Option("--admin-listen", "HOST:PORT of the admin server (/metrics, /healthz, /readyz, "
           "/status, /api/status); empty disables it", "127.0.0.1:9180", _host_port,
           metavar="HOST:PORT"),
    Option("--shutdown-grace", "after SIGTERM, how long running builds may take to finish",
           "5m", parse_duration, metavar="DUR"),
    Option("--log-format", "log format: text or json", "text", _choice("text", "json")),
    Option("--log-level", "log level: debug, info, warning, error", "info",
           _choice("debug", "info", "warning", "error")),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buildkit-gateway",
        description="One BuildKit endpoint in front of a pool of buildkitd replicas. Every "
        "option can also be set by an environment variable (BUILDKIT_GATEWAY_ + the option "
        "name in upper case, '-' as '_'; repeatable options take a comma-separated list) or "
        "by a key of the YAML file given with --config (the option name without dashes). "
        "Precedence: flag, environment, file, default. `buildkit-gateway status --help` "
        "describes the status subcommand.",
    )
    parser.add_argument("--config", metavar="FILE", help="YAML settings file",
                        default=None)
    for opt in OPTIONS:
        parser.add_argument(
            opt.flag,
            dest=opt.key.replace("-", "_"),
            action="append" if opt.repeatable else "store",
            default=None,
            metavar=opt.metavar or opt.key.split("-")[-1].upper(),
            help=f"{opt.help} [env {opt.env}] (default: {_show(opt.default)})",
        )
    return parser


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _read_yaml(path: str) -> Mapping[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from exc
    except ValueError as exc:  # a NUL in the path
        raise ConfigError(f"cannot read config file {path!r}: {exc}") from exc
    import yaml  # only with a config file: PyYAML is about 1 MiB of the process's memory

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except (ValueError, RecursionError) as exc:  # PyYAML's constructors: a bad date, an
        # integer past Python's digit limit; nesting past the recursion limit
        raise ConfigError(f"config file {path} has a value YAML cannot read: "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    known = {o.key for o in OPTIONS} | {"pools"}
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return data


def load(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    args = build_parser().parse_args(list(argv))
    config_path = args.config or environ.get(ENV_PREFIX + "CONFIG")
    file_values = _read_yaml(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw: Any
        flag_value = getattr(args, opt.key.replace("-", "_"))
        if flag_value is not None:
            raw, source = flag_value, f"flag {opt.flag}"
        elif opt.env in environ:
            text = environ[opt.env]
            raw = [p.strip() for p in text.split(",") if p.strip()] if opt.repeatable else text
            source = f"environment variable {opt.env}"
        elif opt.key in file_values:
            raw, source = file_values[opt.key], f"config file key {opt.key!r}"
        else:
            raw, source = opt.default, "default"
        try:
            if opt.repeatable:
                items = raw if isinstance(raw, list) else [raw]
                values[opt.key] = tuple(opt.convert(item) for item in items)
            else:
                values[opt.key] = opt.convert(raw)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"invalid {opt.flag} from {source}: {exc}") from exc
    default = _default_pool(values)
    extra = _extra_pools(file_values.get("pools"), values, config_path or "")
    return _assemble(values, (default, *extra))


# Keys a pool may set; those it leaves out take the top-level value, except where it names
# its replicas (replica, kube-deployment, kube-selector) and where it is reached (authority,
# listen); the scaling keys only where the pool names a Deployment of its own.
_KUBE_KEYS = ("kube-namespace", "kube-deployment", "kube-statefulset", "kube-selector",
              "kube-port")
_SCALING_KEYS = ("min-replicas", "max-replicas", "target-builds", "scale-down-window")
_POOL_KEYS = {"name", "replica", "loadbalance", "load-factor", "max-builds", "max-queue",
              "queue-timeout", "authority", "listen", "tenant-max-builds", "tenant-max-queue",
              "allow", *_KUBE_KEYS, *_SCALING_KEYS}


def _workload(name: str, v: Mapping[str, Any], where: str,
              replicas: tuple[Endpoint, ...]) -> tuple[KubeWorkload | None,
                                                       ScalingSettings | None]:
    """A pool's Kubernetes discovery and scaling, checked for sense."""
    kube = None
    if v["kube-deployment"] and v["kube-statefulset"]:
        raise ConfigError(f"{where}: pool {name} names a Deployment and a StatefulSet; "
                          "use one or the other")
    if v["kube-deployment"] or v["kube-statefulset"] or v["kube-selector"]:
        if replicas:
            raise ConfigError(f"{where}: pool {name} has static replicas and Kubernetes "
                              "discovery; use one or the other")
        kube = KubeWorkload(v["kube-namespace"], v["kube-deployment"], v["kube-selector"],
                            v["kube-port"], statefulset=v["kube-statefulset"])
    if not v["max-replicas"]:
        if v["min-replicas"]:
            raise ConfigError(f"{where}: pool {name} sets --min-replicas without "
                              "--max-replicas")
        return kube, None
    if kube is None or not kube.name:
        raise ConfigError(f"{where}: pool {name} sets --max-replicas but names no "
                          "--kube-deployment or --kube-statefulset to scale")
    if v["min-replicas"] > v["max-replicas"]:
        raise ConfigError(f"{where}: pool {name}: --min-replicas {v['min-replicas']} is above "
                          f"--max-replicas {v['max-replicas']}")
    target = v["target-builds"] or v["max-builds"] or 1
    return kube, ScalingSettings(v["min-replicas"], v["max-replicas"], target,
                                 v["scale-down-window"])


def _default_pool(v: Mapping[str, Any]) -> PoolSettings:
    kube, scaling = _workload("default", v, "top-level options", v["replica"])
    return PoolSettings("default", v["replica"], v["loadbalance"], v["load-factor"],
                        v["max-builds"], v["max-queue"], v["queue-timeout"],
                        tenant_max_builds=v["tenant-max-builds"],
                        tenant_max_queue=v["tenant-max-queue"], allow=v["allow"], kube=kube,
                        scaling=scaling)


def _extra_pools(raw: Any, top: Mapping[str, Any], path: str) -> list[PoolSettings]:
    """Pools from the YAML `pools` list; unset keys take the top-level values."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"config file {path}: pools must be a list of mappings")
    return [_pool(item, f"config file {path}: pools[{i}]", top) for i, item in enumerate(raw)]


def _pool(item: Any, where: str, top: Mapping[str, Any]) -> PoolSettings:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(map(str, item)) - _POOL_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    name = item.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise ConfigError(f"{where}: name must be a lower-case word, got {name!r}")

    def convert(key: str, fn: Callable[[Any], Any], value: Any) -> Any:
        try:
            return fn(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"invalid {key} in {where} ({name}): {exc}") from exc

    def one(key: str, fallback: Any) -> Any:
        return convert(key, _CONVERT[key], item[key]) if key in item else fallback

    def many(key: str, fn: Callable[[Any], Any]) -> tuple[Any, ...]:
        value = item.get(key, [])
        return tuple(convert(key, fn, v) for v in (value if isinstance(value, list) else [value]))

    v = {key: one(key, top[key]) for key in ("loadbalance", "load-factor", "max-builds",
                                              "max-queue", "queue-timeout", "kube-namespace",
                                              "kube-port", "tenant-max-builds",
                                              "tenant-max-queue")}
    v |= {key: one(key, "") for key in ("kube-deployment", "kube-statefulset", "kube-selector")}
    # Only a pool with a workload of its own takes the top-level scaling settings.
    v |= {key: one(key, top[key] if v["kube-deployment"] or v["kube-statefulset"]
                   else _DEFAULTS[key])
          for key in _SCALING_KEYS}
    replicas = many("replica", parse_endpoint)
    kube, scaling = _workload(name, v, where, replicas)
    return PoolSettings(
        name=name,
        replicas=replicas,
        loadbalance=v["loadbalance"],
        load_factor=v["load-factor"],
        max_builds=v["max-builds"],
        max_queue=v["max-queue"],
        queue_timeout=v["queue-timeout"],
        authorities=many("authority", _host),
        listen=many("listen", parse_endpoint),
        tenant_max_builds=v["tenant-max-builds"],
        tenant_max_queue=v["tenant-max-queue"],
        allow=many("allow", str),
        kube=kube,
        scaling=scaling,
    )


_CONVERT = {o.key: o.convert for o in OPTIONS}
_DEFAULTS = {o.key: o.convert(o.default) for o in OPTIONS if not o.repeatable}


def _host(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9.-]+", value):
        raise ValueError(f"expected a host name, got {value!r}")
    return value.lower()


def _assemble(v: Mapping[str, Any], pools: tuple[PoolSettings, ...]) -> Settings:
    if not v["listen"]:
        raise ConfigError("at least one --listen endpoint is required")
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ConfigError(f"pool names must be unique (and not 'default'): {', '.join(names)}")
    replicas = [ep.name for p in pools for ep in p.replicas]
    if len(set(replicas)) != len(replicas):
        raise ConfigError("a replica is listed twice (in --replica or across pools)")
    workloads = [(p.kube.namespace, p.kube.kind, p.kube.name) for p in pools
                 if p.kube is not None and p.kube.name]
    if len(set(workloads)) != len(workloads):
        raise ConfigError("a Deployment or StatefulSet serves more than one pool")
    authorities = [a for p in pools for a in p.authorities]
    if len(set(authorities)) != len(authorities):
        raise ConfigError("an authority selects more than one pool")
    listeners = [str(ep) for ep in v["listen"]] + [str(ep) for p in pools for ep in p.listen]
    if len(set(listeners)) != len(listeners):
        raise ConfigError("an endpoint is listened on twice (--listen or a pool's listen)")
    if v["probe-timeout"] <= 0 or v["probe-interval"] <= 0:
        raise ConfigError("--probe-interval and --probe-timeout must be positive")
    if v["connection-window"] < v["stream-window"]:
        raise ConfigError("--connection-window must be at least --stream-window")
    if bool(v["tlscert"]) != bool(v["tlskey"]):
        raise ConfigError("--tlscert and --tlskey go together")
    if bool(v["replica-tlscert"]) != bool(v["replica-tlskey"]):
        raise ConfigError("--replica-tlscert and --replica-tlskey go together")
    if v["replica-servername"] and not (v["replica-tlscacert"] or v["replica-tlscert"]):
        raise ConfigError("--replica-servername needs TLS toward replicas "
                          "(--replica-tlscacert or --replica-tlscert)")
    if v["tlscacert"] and not v["tlscert"]:
        raise ConfigError("--tlscacert needs --tlscert and --tlskey (TLS on the listener)")
    if v["handshake-timeout"] <= 0 or v["client-write-timeout"] <= 0:
        raise ConfigError("--handshake-timeout and --client-write-timeout must be positive")
    if v["kube-lease-duration"] < 1:
        raise ConfigError("--kube-lease-duration must be at least 1s")
    if v["max-request-header-list"] > v["max-header-list"]:
        raise ConfigError("--max-request-header-list must be at most --max-header-list")
    if v["stream-window"] > 2**31 - 1 or v["connection-window"] > 2**31 - 1:
        raise ConfigError("flow-control windows are at most 2147483647 bytes (RFC 9113)")
    return Settings(
        listen=ListenSettings(v["listen"]),
        pools=pools,
        routing=RoutingSettings(v["session-wait"], v["hold-timeout"],
                                affinity_keys=v["affinity-keys"]),
        relay=RelaySettings(v["stream-window"], v["connection-window"], v["max-header-list"],
                            v["max-client-streams"], v["max-connections"],
                            v["max-connections-per-client"], v["handshake-timeout"],
                            v["client-idle-timeout"], v["client-write-timeout"],
                            v["replica-stream-window"], v["max-request-header-list"]),
        probe=ProbeSettings(v["probe-interval"], v["probe-timeout"], v["eject-backoff"],
                            v["eject-backoff-max"], v["replica-dead-after"]),
        log=LogSettings(v["log-format"], v["log-level"]),
        admin=AdminSettings(v["admin-listen"], v["shutdown-grace"]),
        kube=KubeSettings(v["kubeconfig"], v["kube-context"], lease=v["kube-lease"],
                          lease_duration=v["kube-lease-duration"], identity=v["identity"]),
        tls=TlsSettings(v["tlscert"], v["tlskey"], v["tlscacert"]) if v["tlscert"] else None,
        replica_tls=ReplicaTlsSettings(v["replica-tlscacert"], v["replica-tlscert"],
                                       v["replica-tlskey"], v["replica-servername"])
        if v["replica-tlscacert"] or v["replica-tlscert"] else None,
    )
