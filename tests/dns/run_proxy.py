"""Runs the agent's DNS service (agent.dns.service) alone, with a name table from a JSON file, until SIGTERM: the
capture tests start it inside a pod namespace as uid 1337, where the agent would run it. (The agent proper gets
the table from istiod over NDS; that path is tested with the xDS proxy.)

    python -m tests.dns.run_proxy TABLE.json [ADDRESS] [FORWARD_TIMEOUT]   # prints "ready" once listening
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from agent.dns.metrics import DnsMetrics
from agent.dns.service import build_dns_service
from agent.dns.settings import DEFAULT_ADDRESS, DnsSettings
from agent.dns.table import name_table_from


async def main(argv: list[str], table: dict[str, dict[str, object]]) -> None:
    _, *rest = argv
    settings = DnsSettings(
        address=rest[0] if rest else DEFAULT_ADDRESS,
        forward_timeout=float(rest[1]) if len(rest) > 1 else 5.0,
        proxy_namespace="ns1",
        proxy_domain="ns1.svc.cluster.local",
    )
    service = build_dns_service(settings, DnsMetrics(CollectorRegistry()))
    service.proxy.set_table(name_table_from(table))
    await service.server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await service.server.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1:], json.loads(Path(sys.argv[1]).read_text())))
