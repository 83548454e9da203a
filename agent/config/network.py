"""The pod's IP addresses: INSTANCE_IP first, then the host's non-loopback, non-link-local interface addresses."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Mapping

import psutil


def _usable(address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return None
    return str(ip)


def _administratively_up(stats: object) -> bool:
    """IFF_UP, as Istio checks (net.FlagUp). psutil's `isup` also wants a carrier (IFF_RUNNING), which an interface
    that is up but not yet connected lacks; `flags` has IFF_UP alone (psutil >= 5.9.3)."""
    flags = getattr(stats, "flags", None)
    return "up" in flags.split(",") if isinstance(flags, str) else bool(getattr(stats, "isup", True))


def interface_ips(exclude_interfaces: Iterable[str] = ()) -> list[str]:
    """Addresses of UP interfaces, in interface order (what Istio's GetPrivateIPs returns, without its polling)."""
    excluded = set(exclude_interfaces)
    stats = psutil.net_if_stats()
    result: list[str] = []
    for name, addrs in psutil.net_if_addrs().items():
        if name in excluded or (name in stats and not _administratively_up(stats[name])):
            continue
        for addr in addrs:
            if addr.family.name not in ("AF_INET", "AF_INET6"):
                continue
            usable = _usable(addr.address)
            if usable is not None:
                result.append(usable)
    return result


def discover_ips(instance_ip: str, annotations: Mapping[str, str]) -> list[str]:
    """INSTANCE_IP (when it parses) first, then the interface addresses, or 127.0.0.1 and ::1 when the interfaces
    have none (even with INSTANCE_IP: Istio's pilot-agent app/cmd.go), deduplicated."""
    result: list[str] = []
    with contextlib.suppress(ValueError):
        result.append(str(ipaddress.ip_address(instance_ip.strip())))
    excluded = [s.strip() for s in annotations.get("traffic.sidecar.istio.io/excludeInterfaces", "").split(",")]
    for ip in interface_ips(s for s in excluded if s) or ["127.0.0.1", "::1"]:
        if ip not in result:
            result.append(ip)
    return result
