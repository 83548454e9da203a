"""The DNS proxy's settings, frozen, and Istio's rules for where it listens and which resolv.conf it reads
(pkg/dns/client/dns.go NewLocalDNSServer, pkg/istio-agent/agent.go isDNSServerEnabled)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from agent.config import env_settings as E
from agent.config.envvars import Environment
from agent.dns.resolvconf import ResolvConf, read_resolv_conf
from agent.dns.sockets import SocketPair, bind_dns_sockets
from agent.errors import ConfigError

log = logging.getLogger("agent.dns")

DEFAULT_ADDRESS = "localhost:15053"
DEFAULT_RESOLV_CONF = Path("/etc/resolv.conf")
# Used instead of /etc/resolv.conf when the proxy answers on :53 itself (no capture rules): a VM or a Docker
# container whose /etc/resolv.conf names the agent.
ALTERNATE_RESOLV_CONF = Path("/var/lib/istio/resolv.conf")


@dataclass(frozen=True)
class DnsSettings:
    address: str = DEFAULT_ADDRESS  # DNS_PROXY_ADDR
    forward_timeout: float = 5.0  # DNS_FORWARD_TIMEOUT, seconds per upstream server
    forward_parallel: bool = False  # DNS_FORWARD_PARALLEL
    proxy_namespace: str = ""  # POD_NAMESPACE
    proxy_domain: str = ""  # --domain (default <namespace>.svc.cluster.local)
    resolv_conf: Path = DEFAULT_RESOLV_CONF
    # Forward queries before the first name table instead of answering SERVFAIL (the agent answers on :53 as root).
    respond_before_sync: bool = False
    # Bounds that keep memory flat under a flood: forwarded queries waiting for an upstream answer (more are
    # answered SERVFAIL at once), and open TCP connections (more are closed at once).
    max_pending_forwards: int = 1024
    max_tcp_connections: int = 256


def dns_proxy_enabled(proxy_type: str, dns_capture: bool, dns_server: bool) -> bool:
    """ISTIO_META_DNS_CAPTURE turns the proxy on for sidecars; ISTIO_META_ENABLE_DNS_SERVER for any proxy type."""
    return (dns_capture and proxy_type == "sidecar") or dns_server


def dns_settings_from(
    env: Environment, *, proxy_type: str, namespace: str, domain: str, uid: int, alternate_exists: bool
) -> DnsSettings | None:
    """The DNS proxy's settings from the environment (None when it is off): `domain` is the proxy's DNS domain
    (`--domain`), `uid` the agent's, `alternate_exists` whether ALTERNATE_RESOLV_CONF exists. ConfigError naming
    the variable for a bad value."""
    if not dns_proxy_enabled(proxy_type, env[E.ISTIO_META_DNS_CAPTURE], env[E.ISTIO_META_ENABLE_DNS_SERVER]):
        return None
    settings = DnsSettings(
        address=env[E.DNS_PROXY_ADDR] or DEFAULT_ADDRESS,
        forward_timeout=env[E.DNS_FORWARD_TIMEOUT],
        forward_parallel=env[E.DNS_FORWARD_PARALLEL],
        proxy_namespace=namespace,
        proxy_domain=domain,
    )
    split_address(settings.address)  # a bad address fails the start, naming the variable
    return resolve_address_rules(settings, uid, alternate_exists)


def resolve_address_rules(settings: DnsSettings, uid: int, alternate_exists: bool) -> DnsSettings:
    """Istio's rules for an address on port 53: as root, the proxy forwards before the first table arrives and
    reads ALTERNATE_RESOLV_CONF when that exists; not as root, it logs an error and listens on the default."""
    if not settings.address.endswith(":53"):
        return settings
    if uid != 0:
        log.error("DNS address :53 and not running as root, use default")
        return replace(settings, address=DEFAULT_ADDRESS)
    resolv_conf = ALTERNATE_RESOLV_CONF if alternate_exists else settings.resolv_conf
    return replace(settings, respond_before_sync=True, resolv_conf=resolv_conf)


def split_address(address: str, source: str = "env DNS_PROXY_ADDR") -> tuple[str, int]:
    """host:port ([v6]:port for IPv6); ConfigError naming `source` otherwise."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(source, "", f"must be host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(source, "", f"an IPv6 host must be in brackets, got {address!r}")
    return host, int(port_text)


def listen_addresses(address: str, resolv: ResolvConf) -> list[tuple[str, int]]:
    """Where to listen (UDP and TCP on each). "localhost" means 127.0.0.1 and/or ::1, by the families of the
    resolv.conf servers (Go would pick one family only; a dual-stack pod needs both); 127.0.0.1 when there is no
    server. An empty host means every address."""
    host, port = split_address(address)
    if host == "localhost":
        families = [("127.0.0.1", resolv.has_family(4)), ("::1", resolv.has_family(6))]
        chosen = [(h, port) for h, wanted in families if wanted]
        return chosen or [("127.0.0.1", port)]
    return [(host, port)]


@dataclass
class DnsStartup:
    """What `pilot-agent proxy` prepares before Envoy's exec: the settings and the sockets, already bound."""

    settings: DnsSettings
    sockets: list[SocketPair]

    def close(self) -> None:
        """Close the sockets (a no-op for those the DNS server took over and closed)."""
        for udp, tcp in self.sockets:
            udp.close()
            tcp.close()


def bind_dns(env: Environment, *, proxy_type: str, namespace: str, domain: str, uid: int) -> DnsStartup | None:
    """The DNS proxy's settings and bound sockets when it is on (None otherwise). ConfigError for a bad setting or
    an unreadable resolv.conf; AgentError(STARTUP_FAILED) when an address is in use. Light: no DNS library."""
    settings = dns_settings_from(
        env, proxy_type=proxy_type, namespace=namespace, domain=domain, uid=uid,
        alternate_exists=ALTERNATE_RESOLV_CONF.exists(),
    )  # fmt: skip
    if settings is None:
        return None
    addresses = listen_addresses(settings.address, read_resolv_conf(settings.resolv_conf))
    return DnsStartup(settings, bind_dns_sockets(addresses))
