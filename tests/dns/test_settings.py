"""resolv.conf reading and the listen-address rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config.envvars import Environment
from agent.dns.resolvconf import ResolvConf, parse_resolv_conf, read_resolv_conf
from agent.dns.settings import (
    ALTERNATE_RESOLV_CONF,
    DEFAULT_ADDRESS,
    DnsSettings,
    dns_proxy_enabled,
    dns_settings_from,
    listen_addresses,
    resolve_address_rules,
    split_address,
)
from agent.errors import ConfigError

KUBERNETES = """\
# written by kubelet
search ns1.svc.cluster.local svc.cluster.local cluster.local
nameserver 10.96.0.10
options ndots:5
"""


def test_kubernetes_resolv_conf() -> None:
    conf = parse_resolv_conf(KUBERNETES)
    assert conf == ResolvConf(("10.96.0.10",), ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local"))


def test_last_search_or_domain_line_wins_and_bad_servers_are_left_out() -> None:
    conf = parse_resolv_conf(
        "search a.example b.example\ndomain c.example\nnameserver dns.example\nnameserver fe80::1%eth0\n"
        "nameserver 192.0.2.1 extra\nnameserver\n"
    )
    assert conf.search == ("c.example",)
    assert conf.servers == ("fe80::1%eth0", "192.0.2.1")
    assert conf.has_family(4) and conf.has_family(6)


def test_unreadable_resolv_conf_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "resolv.conf"
    with pytest.raises(ConfigError) as raised:
        read_resolv_conf(missing)
    assert str(missing) in str(raised.value)


def test_localhost_listens_on_the_families_of_the_servers() -> None:
    v4 = parse_resolv_conf("nameserver 10.96.0.10\n")
    v6 = parse_resolv_conf("nameserver fd00::10\n")
    both = parse_resolv_conf("nameserver 10.96.0.10\nnameserver fd00::10\n")
    assert listen_addresses(DEFAULT_ADDRESS, v4) == [("127.0.0.1", 15053)]
    assert listen_addresses(DEFAULT_ADDRESS, v6) == [("::1", 15053)]
    assert listen_addresses(DEFAULT_ADDRESS, both) == [("127.0.0.1", 15053), ("::1", 15053)]
    assert listen_addresses(DEFAULT_ADDRESS, ResolvConf()) == [("127.0.0.1", 15053)]
    assert listen_addresses("[::1]:5353", v4) == [("::1", 5353)]
    assert listen_addresses(":15053", v4) == [("", 15053)]


@pytest.mark.parametrize("bad", ["localhost", "localhost:port", "::1:53", "host:70000", ""])
def test_bad_address_names_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError) as raised:
        split_address(bad)
    assert "DNS_PROXY_ADDR" in str(raised.value)


def test_port_53_rules() -> None:
    on_53 = DnsSettings(address="0.0.0.0:53")
    as_root = resolve_address_rules(on_53, uid=0, alternate_exists=True)
    assert as_root.respond_before_sync and as_root.resolv_conf == ALTERNATE_RESOLV_CONF
    assert resolve_address_rules(on_53, uid=0, alternate_exists=False).resolv_conf == Path("/etc/resolv.conf")
    not_root = resolve_address_rules(on_53, uid=1337, alternate_exists=True)
    assert not_root.address == DEFAULT_ADDRESS and not not_root.respond_before_sync
    assert resolve_address_rules(DnsSettings(), uid=0, alternate_exists=True) == DnsSettings()


def test_enabled_for_sidecars_with_capture_or_anywhere_with_the_server_flag() -> None:
    assert dns_proxy_enabled("sidecar", dns_capture=True, dns_server=False)
    assert not dns_proxy_enabled("router", dns_capture=True, dns_server=False)
    assert dns_proxy_enabled("router", dns_capture=False, dns_server=True)
    assert not dns_proxy_enabled("sidecar", dns_capture=False, dns_server=False)


def settings_from(environ: dict[str, str], proxy_type: str = "sidecar", uid: int = 1337) -> DnsSettings | None:
    return dns_settings_from(
        Environment(environ), proxy_type=proxy_type, namespace="ns1", domain="ns1.svc.cluster.local", uid=uid,
        alternate_exists=False,
    )  # fmt: skip


def test_settings_from_the_environment() -> None:
    assert settings_from({}) is None
    assert settings_from({"ISTIO_META_DNS_CAPTURE": "true"}, proxy_type="router") is None
    on = settings_from({"ISTIO_META_DNS_CAPTURE": "true", "DNS_FORWARD_TIMEOUT": "250ms", "DNS_FORWARD_PARALLEL": "1"})
    assert on == DnsSettings(
        forward_timeout=0.25, forward_parallel=True, proxy_namespace="ns1", proxy_domain="ns1.svc.cluster.local"
    )
    gateway = settings_from({"ISTIO_META_ENABLE_DNS_SERVER": "true", "DNS_PROXY_ADDR": "0.0.0.0:53"}, "router", uid=0)
    assert gateway is not None and gateway.address == "0.0.0.0:53" and gateway.respond_before_sync


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"ISTIO_META_DNS_CAPTURE": "yes"}, "env ISTIO_META_DNS_CAPTURE"),
        ({"ISTIO_META_DNS_CAPTURE": "true", "DNS_FORWARD_TIMEOUT": "soon"}, "env DNS_FORWARD_TIMEOUT"),
        ({"ISTIO_META_DNS_CAPTURE": "true", "DNS_PROXY_ADDR": "localhost"}, "env DNS_PROXY_ADDR"),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from(environ)
    assert str(raised.value).startswith(named)
