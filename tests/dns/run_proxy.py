"""Runs the agent's DNS service (agent.dns.service) alone, with a name table from a JSON file, until SIGTERM: the
capture tests start it inside a pod namespace as uid 1337, where the agent would run it. (The agent proper gets
the table from istiod over NDS; that path is tested with the xDS proxy.)

    python -m tests.dns.run_proxy TABLE.json [ADDRESS] [FORWARD_TIMEOUT]   # prints "ready" once listening

TABLE.json is an istio.networking.nds.v1.NameTable in protobuf JSON (`table_json()` writes one), the form Istio's
DNS proxy program (tests/dns/istio_dns) reads too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from agent.dns.metrics import DnsMetrics
from agent.dns.nds_pb2 import NameTable
from agent.dns.service import build_dns_service
from agent.dns.settings import DEFAULT_ADDRESS, DnsSettings
from agent.dns.table import name_table_from


def table_json(hosts: Mapping[str, Mapping[str, Any]]) -> str:
    """A NameTable in protobuf JSON, from {host: {"ips": [...], "registry": ..., ...}}."""
    text: str = json_format.MessageToJson(name_table_from(hosts))
    return text


async def main(argv: list[str], table: NameTable) -> None:
    _, *rest = argv
    settings = DnsSettings(
        address=rest[0] if rest else DEFAULT_ADDRESS,
        forward_timeout=float(rest[1]) if len(rest) > 1 else 5.0,
        proxy_namespace="ns1",
        proxy_domain="ns1.svc.cluster.local",
    )
    service = build_dns_service(settings, DnsMetrics(CollectorRegistry()))
    service.proxy.set_table(table)
    await service.server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await service.server.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(main(sys.argv[1:], json_format.Parse(Path(sys.argv[1]).read_text(), NameTable())))
