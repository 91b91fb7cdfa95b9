"""gateway/config.py: flags, environment, YAML file, precedence and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config
from gateway.config import ConfigError, Endpoint, load, parse_duration, parse_endpoint

ENV = "BUILDKIT_GATEWAY_"


def write(tmp_path: Path, text: str, name: str = "gw.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    s = load([], {})
    assert s.listen.endpoints == (Endpoint("tcp", "127.0.0.1", 1234),)
    assert s.pool.replicas == ()
    assert s.pool.loadbalance == "sticky"
    assert s.pool.load_factor == 1.25
    assert s.routing.session_wait == 1.0
    assert s.routing.hold_timeout == 1.0
    assert s.relay.stream_window == 17 << 20
    assert s.relay.connection_window == 256 << 20
    assert s.probe.interval == 5.0
    assert s.probe.timeout == 3.0
    assert (s.log.format, s.log.level) == ("text", "info")


def test_flags() -> None:
    s = load([
        "--listen", "tcp://0.0.0.0:1234", "--listen", "unix:///run/gw.sock",
        "--replica", "tcp://10.0.0.1:1234", "--replica", "tcp://[fd00::2]:1234",
        "--loadbalance", "RANDOM", "--load-factor", "1.5", "--session-wait", "500ms",
        "--hold-timeout", "2m", "--stream-window", "20000000", "--connection-window", "40000000",
        "--max-header-list", "65536", "--max-client-streams", "10", "--probe-interval", "1h",
        "--probe-timeout", "0.5", "--log-format", "json", "--log-level", "DEBUG",
    ], {})
    assert s.listen.endpoints == (Endpoint("tcp", "0.0.0.0", 1234),
                                  Endpoint("unix", path="/run/gw.sock"))
    assert [str(e) for e in s.pool.replicas] == ["tcp://10.0.0.1:1234", "tcp://[fd00::2]:1234"]
    assert s.pool.loadbalance == "random"
    assert s.pool.load_factor == 1.5
    assert s.routing.session_wait == pytest.approx(0.5)
    assert s.routing.hold_timeout == 120.0
    assert (s.relay.stream_window, s.relay.connection_window) == (20_000_000, 40_000_000)
    assert (s.relay.max_header_list, s.relay.max_client_streams) == (65536, 10)
    assert (s.probe.interval, s.probe.timeout) == (3600.0, 0.5)
    assert (s.log.format, s.log.level) == ("json", "debug")


def test_env_comma_list_for_repeatable_options() -> None:
    s = load([], {ENV + "REPLICA": "tcp://a:1, tcp://b:2,,tcp://c:3 ",
                  ENV + "LOADBALANCE": "random", ENV + "SESSION_WAIT": "250ms",
                  ENV + "MAX_CLIENT_STREAMS": "7"})
    assert [e.name for e in s.pool.replicas] == ["a:1", "b:2", "c:3"]
    assert s.pool.loadbalance == "random"
    assert s.routing.session_wait == pytest.approx(0.25)
    assert s.relay.max_client_streams == 7


def test_yaml_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
replica:
  - tcp://r1:1234
  - tcp://r2:1234
loadbalance: random
load-factor: 2
session-wait: 750ms
hold-timeout: 3
stream-window: 20000000
probe-interval: 2m
log-level: warning
""")
    s = load(["--config", path], {})
    assert [e.name for e in s.pool.replicas] == ["r1:1234", "r2:1234"]
    assert s.pool.loadbalance == "random"
    assert s.pool.load_factor == 2.0
    assert s.routing.session_wait == pytest.approx(0.75)
    assert s.routing.hold_timeout == 3.0
    assert s.relay.stream_window == 20_000_000
    assert s.probe.interval == 120.0
    assert s.log.level == "warning"


def test_yaml_scalar_for_a_repeatable_option(tmp_path: Path) -> None:
    s = load(["--config", write(tmp_path, "replica: tcp://only:1\n")], {})
    assert [e.name for e in s.pool.replicas] == ["only:1"]


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "log-format: json\n")
    assert load([], {ENV + "CONFIG": path}).log.format == "json"


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    assert load(["--config", write(tmp_path, "")], {}) == load([], {})
    assert load(["--config", write(tmp_path, "# only a comment\n")], {}) == load([], {})


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, "session-wait: 3s\nhold-timeout: 4s\nprobe-timeout: 2s\n"
                           "replica: [tcp://file:1]\n")
    env = {ENV + "SESSION_WAIT": "2s", ENV + "HOLD_TIMEOUT": "6s",
           ENV + "REPLICA": "tcp://env:1"}
    s = load(["--config", path, "--session-wait", "1500ms", "--replica", "tcp://flag:1"], env)
    assert s.routing.session_wait == 1.5  # flag
    assert s.routing.hold_timeout == 6.0  # env over file
    assert s.probe.timeout == 2.0  # file over default
    assert s.probe.interval == 5.0  # default
    assert [e.name for e in s.pool.replicas] == ["flag:1"]  # flags replace, not append
    s = load(["--config", path], env)
    assert [e.name for e in s.pool.replicas] == ["env:1"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2m", 120.0), ("5s", 5.0), ("1h", 3600.0), ("1.5", 1.5), (" 3s ", 3.0),
     ("0", 0.0), (7, 7.0), (0.25, 0.25)],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5 s", "-1s", "1d", "ms", "1.s", "abc", True, -3, "1e3s"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("tcp://127.0.0.1:1234", Endpoint("tcp", "127.0.0.1", 1234)),
        ("tcp://buildkitd-0.buildkitd:1234/", Endpoint("tcp", "buildkitd-0.buildkitd", 1234)),
        ("tcp://[::1]:0", Endpoint("tcp", "::1", 0)),
        ("unix:///run/buildkit/bk.sock", Endpoint("unix", path="/run/buildkit/bk.sock")),
    ],
)
def test_parse_endpoint(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint
    assert parse_endpoint(str(endpoint)) == endpoint


@pytest.mark.parametrize("bad", ["127.0.0.1:1234", "tcp://host", "tcp://host:99999",
                                 "unix://relative.sock", "http://h:1", "tcp://::1:1234",
                                 "tcp://h:12a"])
def test_parse_endpoint_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(bad)


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--loadbalance", "roundrobin"], {}, "--loadbalance"),
        (["--load-factor", "0"], {}, "--load-factor"),
        (["--load-factor", "0.5"], {}, "--load-factor"),
        (["--load-factor", "x"], {}, "--load-factor"),
        (["--stream-window", "-1"], {}, "--stream-window"),
        (["--stream-window", "65536"], {}, "--stream-window"),
        (["--max-client-streams", "1.5"], {}, "--max-client-streams"),
        (["--session-wait", "forever"], {}, "--session-wait"),
        (["--replica", "10.0.0.1:1234"], {}, "--replica"),
        (["--listen", "tcp://h:70000"], {}, "--listen"),
        (["--log-level", "trace"], {}, "--log-level"),
        ([], {ENV + "LOG_FORMAT": "xml"}, ENV + "LOG_FORMAT"),
        ([], {ENV + "REPLICA": "tcp://a:1,bogus"}, ENV + "REPLICA"),
        ([], {ENV + "PROBE_TIMEOUT": "-1"}, ENV + "PROBE_TIMEOUT"),
    ],
)
def test_invalid_values_name_option_and_source(argv: list[str], env: dict[str, str],
                                               needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(argv, env)
    assert needle in str(err.value)
    source = "flag" if argv else "environment variable"
    assert source in str(err.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("loadbalance: nearest\n", "loadbalance"),
        ("stream-window: many\n", "stream-window"),
        ("stream-window: [1, 2]\n", "stream-window"),
        ("session-wait: -2\n", "session-wait"),
        ("replica: [tcp://ok:1, nope]\n", "replica"),
        ("load-factor: -1.5\n", "load-factor"),
    ],
)
def test_invalid_file_values_name_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(["--config", write(tmp_path, text)], {})
    assert f"config file key {key!r}" in str(err.value)


def test_unknown_yaml_keys_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "replica: [tcp://a:1]\nload_factor: 2\nbogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load(["--config", path], {})
    assert "bogus" in str(err.value) and "load_factor" in str(err.value)
    assert path in str(err.value)


@pytest.mark.parametrize("text", ["replica: [tcp://a:1\n", "a: b: c\n", "key: 'open\n",
                                  "\tlisten: x\n"])
def test_malformed_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(["--config", path], {})
    assert path in str(err.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load(["--config", write(tmp_path, text)], {})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(["--config", str(tmp_path / "absent.yaml")], {})


def test_duplicate_replicas_rejected() -> None:
    with pytest.raises(ConfigError, match="twice"):
        load(["--replica", "tcp://a:1", "--replica", "tcp://b:1", "--replica", "tcp://a:1/"], {})
    with pytest.raises(ConfigError, match="twice"):
        load([], {ENV + "REPLICA": "tcp://[::1]:5,tcp://[::1]:5"})
    assert len(load(["--replica", "tcp://a:1", "--replica", "tcp://a:2"], {}).pool.replicas) == 2


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="connection-window"):
        load(["--stream-window", "30000000", "--connection-window", "20000000"], {})
    with pytest.raises(ConfigError, match="2147483647"):
        load(["--stream-window", str(2**31), "--connection-window", str(2**31)], {})
    with pytest.raises(ConfigError, match="listen"):
        load([], {ENV + "LISTEN": ""})
    with pytest.raises(ConfigError, match="probe"):
        load(["--probe-timeout", "0"], {})


def test_every_option_has_flag_env_and_yaml_key() -> None:
    for opt in config.OPTIONS:
        assert opt.flag.startswith("--")
        assert opt.env == ENV + opt.flag[2:].upper().replace("-", "_")
        assert opt.key == opt.flag[2:]


@pytest.mark.parametrize("text", ["replica:\n", "replica: 123\n", "listen: [{a: 1}]\n"])
def test_non_string_endpoint_in_yaml_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load(["--config", write(tmp_path, text)], {})


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"log-level: d\xe9bug\n")
    with pytest.raises(ConfigError):
        load(["--config", str(path)], {})


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_load_factor_must_be_finite(value: str) -> None:
    with pytest.raises(ConfigError):
        load(["--load-factor", value], {})


@pytest.mark.parametrize("text", ["max-client-streams: 1.5\n", "stream-window: yes\n"])
def test_yaml_integer_options_reject_floats_and_booleans(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load(["--config", write(tmp_path, text)], {})


def test_kubernetes_discovery_and_scaling_flags() -> None:
    s = load(["--kube-namespace", "ci", "--kube-deployment", "buildkitd", "--kube-port",
              "buildkitd", "--max-replicas", "4", "--min-replicas", "1", "--max-builds", "3",
              "--scale-down-window", "2m", "--kubeconfig", "/k", "--kube-context", "c"], {})
    assert s.pool.kube == config.KubeWorkload("ci", "buildkitd", "", "buildkitd")
    # target-builds defaults to the replica's slots
    assert s.pool.scaling == config.ScalingSettings(1, 4, 3, 120.0)
    assert (s.kube.kubeconfig, s.kube.context) == ("/k", "c")
    stateful = load(["--kube-statefulset", "buildkitd", "--max-replicas", "3"], {})
    assert stateful.pool.kube is not None and stateful.pool.kube.kind == "StatefulSet"
    assert stateful.pool.kube.name == "buildkitd" and stateful.pool.scaling is not None
    with pytest.raises(config.ConfigError, match="a Deployment and a StatefulSet"):
        load(["--kube-statefulset", "a", "--kube-deployment", "b"], {})
    plain = load(["--kube-selector", "app=buildkitd"], {})
    assert plain.pool.kube is not None and plain.pool.kube.port == 1234
    assert plain.pool.scaling is None  # discovery only


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-replicas", "3"], "names no --kube-deployment"),
    (["--kube-selector", "a=b", "--max-replicas", "3"], "names no --kube-deployment"),
    (["--kube-deployment", "b", "--replica", "tcp://h:1"], "static replicas and Kubernetes"),
    (["--kube-deployment", "b", "--max-replicas", "1", "--min-replicas", "2"],
     "--min-replicas 2 is above --max-replicas 1"),
    (["--kube-deployment", "b", "--min-replicas", "2"], "without --max-replicas"),
    (["--kube-deployment", "Bad_Name"], "invalid --kube-deployment"),
    (["--kube-deployment", "b", "--kube-port", "70000"], "invalid --kube-port"),
])
def test_kubernetes_settings_that_make_no_sense_are_refused(argv: list[str],
                                                            message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        load(argv, {})


def test_pools_name_their_own_deployment_and_inherit_scaling(tmp_path: Path) -> None:
    path = write(tmp_path, """
kube-namespace: builders
kube-deployment: buildkitd-amd64
max-replicas: 5
scale-down-window: 1m
pools:
  - name: arm64
    kube-deployment: buildkitd-arm64
    max-replicas: 2
    authority: [arm64.builders.example]
  - name: static
    replica: [tcp://10.0.0.9:1234]
""")
    s = load(["--config", path], {})
    default, arm, static = s.pools
    assert default.kube is not None and default.kube.deployment == "buildkitd-amd64"
    assert arm.kube == config.KubeWorkload("builders", "buildkitd-arm64", "", 1234)
    assert arm.scaling == config.ScalingSettings(0, 2, 1, 60.0)
    assert static.kube is None and static.scaling is None
    twice = write(tmp_path, "kube-deployment: b\npools: [{name: x, kube-deployment: b}]\n",
                  "twice.yaml")
    with pytest.raises(ConfigError, match="serves more than one pool"):
        load(["--config", twice], {})


def test_a_config_path_with_a_nul_byte_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(["--config", "gw\0.yaml"], {})


def test_tls_options_go_together() -> None:
    s = load(["--tlscert", "/c.pem", "--tlskey", "/k.pem", "--tlscacert", "/ca.pem"], {})
    assert s.tls == config.TlsSettings("/c.pem", "/k.pem", "/ca.pem")
    assert load([], {}).tls is None
    with pytest.raises(ConfigError, match="go together"):
        load(["--tlscert", "/c.pem"], {})
    with pytest.raises(ConfigError, match="needs --tlscert"):
        load(["--tlscacert", "/ca.pem"], {})


def test_tenant_limits_and_allow_lists_per_pool(tmp_path: Path) -> None:
    path = write(tmp_path, """
tenant-max-builds: 3
tenant-max-queue: 10
allow: [team-a.builders.example]
pools:
  - name: gpu
    replica: [tcp://10.0.0.9:1234]
    tenant-max-builds: 1
    allow: [team-b.builders.example, 10.1.2.3]
""")
    default, gpu = load(["--config", path], {}).pools
    assert (default.tenant_max_builds, default.tenant_max_queue, default.allow) == (
        3, 10, ("team-a.builders.example",))
    assert (gpu.tenant_max_builds, gpu.tenant_max_queue, gpu.allow) == (
        1, 10, ("team-b.builders.example", "10.1.2.3"))


def test_tls_toward_replicas_options() -> None:
    s = load(["--replica-tlscacert", "/ca.pem", "--replica-servername", "buildkitd"], {})
    assert s.replica_tls == config.ReplicaTlsSettings("/ca.pem", "", "", "buildkitd")
    assert load([], {}).replica_tls is None
    with pytest.raises(ConfigError, match="go together"):
        load(["--replica-tlscert", "/c.pem"], {})
    with pytest.raises(ConfigError, match="needs TLS toward replicas"):
        load(["--replica-servername", "buildkitd"], {})
