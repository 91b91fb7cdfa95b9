"""Command line: `buildkit-gateway [options]` runs the gateway in the foreground until SIGTERM
or SIGINT. Options come from flags, environment variables and a YAML file (gateway/config.py);
invalid settings exit with status 2 and a message naming the option.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from gateway import config, logs
from gateway.app import Gateway

log = logging.getLogger("gateway")


async def _serve(settings: config.Settings) -> None:
    gateway = Gateway(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.stop.set)
    await gateway.run()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = config.load(sys.argv[1:] if argv is None else argv, os.environ)
    except config.ConfigError as exc:
        print(f"buildkit-gateway: {exc}", file=sys.stderr)
        return 2
    logs.setup(fmt=settings.log.format, level=settings.log.level)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(settings))
    else:
        uvloop.run(_serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
