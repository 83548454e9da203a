"""The DNS proxy on the status port: readiness waits for the first name table (after Envoy's probes, with a real
Envoy), and /debug/ndsz shows the table."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from agent.dns.metrics import DnsMetrics
from agent.dns.service import NOT_READY, NameTableProbe, build_dns_service, ndsz_json
from agent.dns.settings import DnsSettings
from agent.dns.table import name_table_from
from agent.lifecycle import Lifecycle
from agent.metrics import AgentMetrics
from agent.proxy.admin import AdminClient
from agent.status import StatusServer
from tests.dns.istio_cases import TABLE
from tests.status.conftest import settings_for
from tests.status.envoy_stack import EnvoyStack, envoy_stack
from tests.support.envoy import free_port

pytestmark = [pytest.mark.envoy]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyStack]:
    with envoy_stack(tmp_path_factory.mktemp("envoy"), free_port()) as running:
        yield running


async def test_ready_only_once_the_name_table_arrived(stack: EnvoyStack, tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search ns1.svc.cluster.local\nnameserver 127.0.0.1\n")
    settings = DnsSettings(resolv_conf=resolv, proxy_namespace="ns1", proxy_domain="ns1.svc.cluster.local")
    metrics = AgentMetrics(CollectorRegistry())
    service = build_dns_service(settings, DnsMetrics(metrics.registry))
    lifecycle = Lifecycle()
    lifecycle.envoy_up()
    status_settings = settings_for(stack)
    server = StatusServer(
        status_settings, lifecycle, metrics, AdminClient(port=status_settings.admin_port),
        extra_probes=[NameTableProbe(service.proxy)], debug_views={"/debug/ndsz": lambda: ndsz_json(service.proxy)},
    )  # fmt: skip
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/healthz/ready") as response:
                assert response.status == 503
                assert (await response.text()).strip() == NOT_READY
            async with session.get(base + "/debug/ndsz") as response:
                assert response.status == 404
                assert await response.text() == "{}"
            service.proxy.set_table(name_table_from(TABLE))
            async with session.get(base + "/healthz/ready") as response:
                assert response.status == 200
            async with session.get(base + "/debug/ndsz") as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                shown = json.loads(await response.text())
            assert shown["table"]["productpage."]["ips"] == ["9.9.9.9"]
            # Envoy restarted: its facts are re-earned, the table's is not lost.
            lifecycle.envoy_down("crashed")
            lifecycle.envoy_up()
            async with session.get(base + "/healthz/ready") as response:
                assert response.status == 200
    finally:
        await server.stop()
