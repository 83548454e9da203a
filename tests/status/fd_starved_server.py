"""A StatusServer whose process has almost no file descriptors left, for test_connections.py (run under prlimit).

After the server listens, it takes every free descriptor but SPARE (as another part of the agent could), prints its
port, and serves until stdin closes. Its own metrics are served at /stats/prometheus (no Envoy is merged).
"""

from __future__ import annotations

import asyncio
import os
import sys

from agent.lifecycle import Lifecycle
from agent.logs import configure
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.status import StatusServer, StatusSettings
from agent.status.connections import ConnectionLimits

SPARE = 20


def take_descriptors(spare: int) -> list[int]:
    taken: list[int] = []
    while True:
        try:
            taken.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    for fd in taken[:spare]:
        os.close(fd)
    return taken[spare:]


async def main() -> None:
    configure("default:info", False)
    settings = StatusSettings(status_port=0, listen_host="127.0.0.1", admin_port=9, merge_envoy_stats=False)
    server = StatusServer(
        settings, Lifecycle(), AgentMetrics(), AdminClient(port=9), limits=ConnectionLimits(header_timeout=60)
    )
    await server.start()
    held = take_descriptors(SPARE)
    print(server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for fd in held:
        os.close(fd)
    await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
