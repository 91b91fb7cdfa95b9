"""Command line.

`buildkit-gateway [options]` runs the gateway in the foreground until SIGTERM or SIGINT.
Options come from flags, environment variables and a YAML file (gateway/config.py); invalid
settings exit with status 2 and a message naming the option.

`buildkit-gateway status [--admin URL]` prints the state of a running gateway as a table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from gateway import config, logs
from gateway.admin import table
from gateway.app import Gateway

log = logging.getLogger("gateway")


async def _serve(settings: config.Settings) -> None:
    gateway = Gateway(settings, settle_gc=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop.set)
    await gateway.run()


def _status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="buildkit-gateway status",
        description="Print the replicas, queue and recent builds of a running gateway.")
    parser.add_argument("--admin", metavar="URL",
                        default=os.environ.get(config.ENV_PREFIX + "ADMIN", "127.0.0.1:9180"),
                        help="the gateway's admin address (--admin-listen) "
                             f"[env {config.ENV_PREFIX}ADMIN] (default: %(default)s)")
    args = parser.parse_args(list(argv))
    return table.main(args.admin)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:
        return _status(argv[1:])
    try:
        settings = config.load(argv, os.environ)
    except config.ConfigError as exc:
        print(f"buildkit-gateway: {exc}", file=sys.stderr)
        return 2
    logs.setup(fmt=settings.log.format, level=settings.log.level)
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(_serve(settings))
    except config.ConfigError as exc:  # found at start-up (e.g. no Kubernetes configuration)
        print(f"buildkit-gateway: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
