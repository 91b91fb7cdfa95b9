"""Repository checks that run with the suite: lint, types, generated stubs, README contract."""

from __future__ import annotations

import filecmp
import os
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


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    result = _run("bash", "proto/generate.sh", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for generated in sorted((ROOT / "gateway" / "pb").glob("*_pb2*.py*")):
        assert filecmp.cmp(generated, tmp_path / generated.name, shallow=False), generated.name


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
