"""A StatusServer on Istio's real port 15020, run by test_pod_netns.py inside a pod network namespace only.

Prints `ready` once listening and `shutdown: <cause> skip_drain=<bool>` when a shutdown is requested, then exits.
"""

from __future__ import annotations

import asyncio
import os

from agent.config.envvars import Environment
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.status import StatusServer, StatusSettings


async def main() -> None:
    settings = StatusSettings.from_env(Environment(os.environ), status_port=15020, instance_ip="10.10.0.2")
    lifecycle = Lifecycle()
    server = StatusServer(settings, lifecycle, AgentMetrics(), AdminClient(port=15000))
    await server.start()
    print("ready", flush=True)
    try:
        await lifecycle.wait_shutdown()
        print(f"shutdown: {lifecycle.shutdown_cause} skip_drain={lifecycle.skip_drain}", flush=True)
    finally:
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
