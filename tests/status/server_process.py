"""A StatusServer in a process of its own, for tests that measure the agent's memory or starve its descriptors.

    python -m tests.status.server_process [--port P] [--admin-port P [--merge-envoy]] [--app-port P]
                                          [--spare-descriptors N]

Prints its port once listening (after taking every free descriptor but N, when asked: as another part of the agent
could), and serves until stdin closes. Envoy is treated as up; without --merge-envoy its metrics are not merged
(/stats/prometheus then shows the agent's own and the application's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from agent.lifecycle import Lifecycle
from agent.logs import configure
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.status import StatusServer, StatusSettings
from agent.status.connections import ConnectionLimits
from agent.status.settings import ScrapeTarget


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


async def main(args: argparse.Namespace) -> None:
    configure("default:info", False)
    settings = StatusSettings(
        status_port=args.port,
        listen_host="127.0.0.1",
        admin_port=args.admin_port,
        merge_envoy_stats=args.merge_envoy,
        scrape_targets=(ScrapeTarget(args.app_port),) if args.app_port else (),
    )
    lifecycle = Lifecycle()
    lifecycle.envoy_up()
    admin = AdminClient(port=args.admin_port)
    server = StatusServer(settings, lifecycle, AgentMetrics(), admin, limits=ConnectionLimits(header_timeout=60))
    await server.start()
    held = take_descriptors(args.spare_descriptors) if args.spare_descriptors is not None else []
    print(server.port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for fd in held:
        os.close(fd)
    await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--merge-envoy", action="store_true")
    parser.add_argument("--admin-port", type=int, default=9)
    parser.add_argument("--app-port", type=int, default=0)
    parser.add_argument("--spare-descriptors", type=int)
    asyncio.run(main(parser.parse_args()))
