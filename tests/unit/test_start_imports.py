"""The gateway imports what only some configurations use when they are set, not at start-up:
the Kubernetes client (about 40 MiB of RSS), aiohttp (the admin server, about 10 MiB) and
PyYAML (--config). bench/README.md, "Idle connections and builds in flight", has the figures."""

from __future__ import annotations

import json
import subprocess
import sys

LAZY = ("kubernetes_asyncio", "aiohttp", "yaml")


def _loaded_by(code: str) -> list[str]:
    probe = (f"import json, sys\n{code}\n"
             f"print(json.dumps(sorted(m for m in {LAZY!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_the_command_line_and_the_gateway_import_none_of_them() -> None:
    assert _loaded_by("import gateway.cli, gateway.app") == []


def test_a_static_configuration_loads_without_them() -> None:
    code = ("from gateway import config\n"
            "config.load(['--replica', 'tcp://127.0.0.1:1235', '--admin-listen', ''], {})")
    assert _loaded_by(code) == []
