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

import yaml

ENV_PREFIX = "BUILDKIT_GATEWAY_"


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
class PoolSettings:
    replicas: tuple[Endpoint, ...]
    """Static buildkitd replicas of the default pool."""
    loadbalance: str
    """"sticky" (consistent hashing on the build's context) or "random" (two choices)."""
    load_factor: float
    """Bounded loads: skip a replica above load_factor x the average active builds."""


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    session_wait: float
    """Seconds a Solve waits for its Session (the sticky key) before using the fallback key."""
    hold_timeout: float
    """Seconds a Session/Status/LLBBridge call may wait for its build's Solve to be placed."""


@dataclass(frozen=True, slots=True)
class RelaySettings:
    stream_window: int
    """Flow-control window the gateway grants each client stream (bytes)."""
    connection_window: int
    """Connection window granted to clients and replicas; caps bytes buffered per connection."""
    max_header_list: int
    """Largest decoded header list accepted (error trailers carry stack traces)."""
    max_client_streams: int
    """SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients."""


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    interval: float
    """Seconds between probes (ListWorkers + Info) of each replica; also refreshes caches."""
    timeout: float
    """Seconds a probe may take before the replica counts as unreachable."""


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str
    """"text" or "json"."""
    level: str
    """debug, info, warning or error."""


@dataclass(frozen=True, slots=True)
class Settings:
    listen: ListenSettings
    pool: PoolSettings
    routing: RoutingSettings
    relay: RelaySettings
    probe: ProbeSettings
    log: LogSettings


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
    Option("--replica", "static buildkitd replica of the default pool, tcp://HOST:PORT "
           "(repeatable)", [], parse_endpoint, True, "ADDR"),
    Option("--loadbalance", "placement policy: sticky (consistent hashing, warm caches) or "
           "random", "sticky", _choice("sticky", "random")),
    Option("--load-factor", "bounded loads: a replica above this x the average active builds "
           "is skipped for the next on the ring (at least 1)", 1.25, _load_factor),
    Option("--session-wait", "how long a Solve waits for its Session to learn its sticky key",
           "1s", parse_duration, metavar="DUR"),
    Option("--hold-timeout", "how long a call may wait for its build's Solve before it is "
           "routed by fallback", "5s", parse_duration, metavar="DUR"),
    Option("--stream-window", "flow-control window granted per client stream, bytes",
           16 << 20, _positive_int),
    Option("--connection-window", "flow-control window per connection, bytes (caps buffering)",
           256 << 20, _positive_int),
    Option("--max-header-list", "largest header list accepted, bytes", 16 << 20, _positive_int),
    Option("--max-client-streams", "concurrent streams allowed per client connection", 1000,
           _positive_int),
    Option("--probe-interval", "time between probes of each replica", "5s", parse_duration,
           metavar="DUR"),
    Option("--probe-timeout", "time a probe may take", "3s", parse_duration, metavar="DUR"),
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
        "Precedence: flag, environment, file, default.",
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    known = {o.key for o in OPTIONS}
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
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid {opt.flag} from {source}: {exc}") from exc
    return _assemble(values)


def _assemble(v: Mapping[str, Any]) -> Settings:
    if not v["listen"]:
        raise ConfigError("at least one --listen endpoint is required")
    for ep in v["replica"]:
        if ep.scheme != "tcp" and ep.scheme != "unix":
            raise ConfigError(f"unsupported replica address {ep}")
    if len({ep.name for ep in v["replica"]}) != len(v["replica"]):
        raise ConfigError("--replica lists the same replica twice")
    if v["probe-timeout"] <= 0 or v["probe-interval"] <= 0:
        raise ConfigError("--probe-interval and --probe-timeout must be positive")
    if v["connection-window"] < v["stream-window"]:
        raise ConfigError("--connection-window must be at least --stream-window")
    if v["stream-window"] > 2**31 - 1 or v["connection-window"] > 2**31 - 1:
        raise ConfigError("flow-control windows are at most 2147483647 bytes (RFC 9113)")
    return Settings(
        listen=ListenSettings(v["listen"]),
        pool=PoolSettings(v["replica"], v["loadbalance"], v["load-factor"]),
        routing=RoutingSettings(v["session-wait"], v["hold-timeout"]),
        relay=RelaySettings(v["stream-window"], v["connection-window"], v["max-header-list"],
                            v["max-client-streams"]),
        probe=ProbeSettings(v["probe-interval"], v["probe-timeout"]),
        log=LogSettings(v["log-format"], v["log-level"]),
    )
