"""Repository checks that run with the suite: lint, types, generated stubs, README contract."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          check=False, env=env)


def test_ruff_is_clean() -> None:
    result = _run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean_on_gateway() -> None:
    result = _run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


# The lines that name the generator's version, not the protos' content: a grpcio-tools bump
# alone changes them, which is not staleness (the import check below covers compatibility).
_GENERATOR_VERSION = re.compile(
    r"GRPC_GENERATED_VERSION = '[^']*'|Protobuf Python Version: \S+"
    r"|ValidateProtobufRuntimeVersion\([^)]*\)")


def _without_generator_version(path: Path) -> str:
    return _GENERATOR_VERSION.sub("<generator version>", path.read_text())


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    """Regenerated with the locked grpcio-tools, the stubs equal the committed ones."""
    result = _run("bash", "proto/generate.sh", str(tmp_path))
    assert result.returncode == 0, result.stderr
    committed = sorted((ROOT / "gateway" / "pb").glob("*_pb2*.py*"))
    assert committed
    for generated in committed:
        assert _without_generator_version(generated) == _without_generator_version(
            tmp_path / generated.name), f"{generated.name} is stale: run proto/generate.sh"


def test_generated_stubs_import_with_the_locked_runtime() -> None:
    """The stubs' own version checks (grpcio, protobuf runtime) pass with what is installed."""
    result = _run(sys.executable, "-c",
                  "import gateway.pb.control_pb2_grpc, gateway.pb.gateway_pb2_grpc")
    assert result.returncode == 0, result.stderr


def _locked(path: Path, *, here_only: bool = False) -> dict[str, str]:
    """name -> pinned version; `here_only` drops pins whose marker excludes this platform."""
    from packaging.markers import Marker

    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        requirement, _, marker = line.split("#", 1)[0].partition(";")
        if not requirement.strip() or (here_only and marker and not Marker(marker).evaluate()):
            continue
        name, _, version = requirement.partition("==")
        assert version, f"{path.name}: {line!r} is not pinned with =="
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_the_locks_cover_pyproject_and_agree() -> None:
    """Every dependency of pyproject.toml is pinned, within its range, the same in both locks."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    run, test = _locked(ROOT / "requirements.txt"), _locked(ROOT / "requirements-test.txt")
    for locked, needed in ((run, project["dependencies"]),
                           (test, [*project["dependencies"],
                                   *project["optional-dependencies"]["test"]])):
        for text in needed:
            requirement = Requirement(text)
            name = requirement.name.lower().replace("_", "-")
            assert name in locked, f"{name} is not locked: run hack/lock"
            assert requirement.specifier.contains(locked[name], prereleases=True), (
                f"{name}=={locked[name]} is outside {requirement.specifier}: run hack/lock")
    assert {name: test[name] for name in run} == run, "the two locks disagree: run hack/lock"


def test_installed_versions_are_the_locked_ones() -> None:
    """This environment was installed from the test lock (README, .ci/run, hack/fresh-check)."""
    from importlib.metadata import PackageNotFoundError, version

    wrong = []
    for name, pinned in _locked(ROOT / "requirements-test.txt", here_only=True).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed != pinned:
            wrong.append(f"{name} {installed} (locked {pinned})")
    assert not wrong, "not installed from requirements-test.txt: " + ", ".join(wrong)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```")
    commands = [line for line in blocks[1].splitlines()[1:] if line.strip()]
    assert len(commands) == 2, commands
    assert "buildkit-gateway" in commands[0] and "--replica" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci


def test_import_layers_hold() -> None:
    result = _run(str(BIN / "lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
