"""The upstream servers and the search list, read from resolv.conf the way Istio's agent reads it (miekg/dns
ClientConfigFromFile): `nameserver` lines in order, the last `search` or `domain` line wins, port 53.

One difference: a `nameserver` that is not an IP address is left out here (Istio keeps it and every forward to it
fails); the capture rules (`agent/iptables`) read the same servers, so both sides agree on what is upstream.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError

DNS_PORT = 53


@dataclass(frozen=True)
class ResolvConf:
    # IP addresses as written (an IPv6 link-local address keeps its %zone: needed to reach it).
    servers: tuple[str, ...] = ()
    # Search domains as written, without a trailing dot added.
    search: tuple[str, ...] = ()

    def has_family(self, version: int) -> bool:
        return any(ipaddress.ip_address(s.split("%", 1)[0]).version == version for s in self.servers)


def parse_resolv_conf(text: str) -> ResolvConf:
    servers: list[str] = []
    search: tuple[str, ...] = ()
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        keyword, args = words[0], words[1:]
        if keyword == "nameserver" and args:
            try:
                ipaddress.ip_address(args[0].split("%", 1)[0])
            except ValueError:
                continue
            servers.append(args[0])
        elif keyword == "domain":
            search = tuple(args[:1])
        elif keyword == "search":
            search = tuple(args)
    return ResolvConf(tuple(servers), search)


def read_resolv_conf(path: Path) -> ResolvConf:
    """ConfigError naming the file when it cannot be read (Istio's agent fails to start then too)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(str(path), "nameserver", f"cannot read: {exc.strerror}") from None
    return parse_resolv_conf(text)
