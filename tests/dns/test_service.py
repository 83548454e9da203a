"""The DNS service as the agent builds it: settings + resolv.conf, the readiness probe, /debug/ndsz's body."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from prometheus_client import CollectorRegistry

from agent.dns.metrics import DnsMetrics
from agent.dns.service import (
    NDS_TYPE_URL,
    NOT_READY,
    NameTableProbe,
    build_dns_service,
    name_table_handler,
    ndsz_json,
)
from agent.dns.settings import DnsSettings
from agent.dns.table import name_table_from
from agent.errors import ConfigError
from agent.status.readiness import NotReady
from tests.dns.istio_cases import TABLE


def settings_with(tmp_path: Path, text: str, **kwargs: object) -> DnsSettings:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(text)
    return DnsSettings(resolv_conf=resolv, proxy_namespace="ns1", proxy_domain="ns1.svc.cluster.local", **kwargs)  # type: ignore[arg-type]


def test_built_from_resolv_conf(tmp_path: Path) -> None:
    text = "search ns1.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10\n"
    service = build_dns_service(settings_with(tmp_path, text, forward_timeout=2.5), DnsMetrics(CollectorRegistry()))
    assert service.proxy.upstream.settings.servers == (("10.96.0.10", 53), ("fd00::10", 53))
    assert service.proxy.upstream.settings.timeout == 2.5
    assert service.proxy.table_settings.search_domains == ("ns1.svc.cluster.local", "svc.cluster.local")
    assert service.server.addresses == (("127.0.0.1", 15053), ("::1", 15053))


def test_unreadable_resolv_conf_is_a_config_error(tmp_path: Path) -> None:
    settings = DnsSettings(resolv_conf=tmp_path / "missing")
    with pytest.raises(ConfigError):
        build_dns_service(settings, DnsMetrics(CollectorRegistry()))


async def test_probe_waits_for_the_first_table(tmp_path: Path) -> None:
    service = build_dns_service(settings_with(tmp_path, "nameserver 10.96.0.10\n"), DnsMetrics(CollectorRegistry()))
    probe = NameTableProbe(service.proxy)
    assert not probe.passed
    with pytest.raises(NotReady, match=NOT_READY):
        await probe.check()
    service.proxy.set_table(name_table_from({}))
    await probe.check()
    probe.forget()  # Envoy restarted: the table is still there
    assert probe.passed


def test_ndsz_shows_the_table_with_alternate_names(tmp_path: Path) -> None:
    search = "search ns1.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\n"
    service = build_dns_service(settings_with(tmp_path, search), DnsMetrics(CollectorRegistry()))
    assert ndsz_json(service.proxy) is None
    service.proxy.set_table(name_table_from(TABLE))
    body = json.loads(ndsz_json(service.proxy) or "")
    assert body["table"]["productpage.ns1.svc.cluster.local"] == {
        "ips": ["9.9.9.9"], "registry": "Kubernetes", "namespace": "ns1", "shortname": "productpage",
    }  # fmt: skip
    assert body["table"]["productpage."] == {"ips": ["9.9.9.9"], "registry": "Kubernetes"}
    assert body["table"]["svc-with-alt.ns1.svc.cluster.local"]["altHosts"] == ["svc-with-alt.ns1.svc.clusterset.local"]


async def test_nds_handler_serves_the_table_and_rejects_what_is_not_one(tmp_path: Path) -> None:
    service = build_dns_service(settings_with(tmp_path, "nameserver 10.96.0.10\n"), DnsMetrics(CollectorRegistry()))
    handle = name_table_handler(service.proxy)
    resource = any_pb2.Any()
    resource.Pack(name_table_from(TABLE))
    assert resource.type_url == NDS_TYPE_URL
    await handle(resource)
    assert service.proxy.ready and "www.google.com." in service.proxy._lookup  # type: ignore[operator]
    with pytest.raises(ValueError, match="does not parse"):
        await handle(any_pb2.Any(type_url=NDS_TYPE_URL, value=b"\xff\xff\xff"))
    with pytest.raises(ValueError, match=r"expected a .*NameTable, got .*Listener"):
        await handle(any_pb2.Any(type_url="type.googleapis.com/envoy.config.listener.v3.Listener", value=b""))
    assert service.proxy.tables_received == 1  # a rejected table leaves the served one alone
