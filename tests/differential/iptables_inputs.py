"""Hypothesis strategies for `istio-iptables` inputs: flag and env sets across the documented surface.

`valid_invocations()` draws what both implementations must accept and render identically: ports and port ranges,
CIDR lists (IPv4 and IPv6, `*`), uid/gid lists, REDIRECT/TPROXY, DNS capture, drop-invalid, dual-stack, exclusions,
virtual and excluded interfaces, owner groups and the loopback CIDR (env only), each flag given as a flag, as its
env var, or not at all. The host it runs on is drawn too: which addresses the pod has and what resolv.conf lists.
`rejected_by_both()` draws inputs Istio itself refuses.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from hypothesis import strategies as st

# Flag short/long names (tools/istio-iptables/pkg/cmd/root.go); the env var is the long name in UPPER_SNAKE.
STRING_FLAGS = {
    "p": "envoy-port",
    "z": "inbound-capture-port",
    "e": "inbound-tunnel-port",
    "u": "proxy-uid",
    "g": "proxy-gid",
    "m": "istio-inbound-interception-mode",
    "b": "istio-inbound-ports",
    "d": "istio-local-exclude-ports",
    "c": "istio-exclude-interfaces",
    "i": "istio-service-cidr",
    "x": "istio-service-exclude-cidr",
    "q": "istio-outbound-ports",
    "o": "istio-local-outbound-ports-exclude",
    "k": "kube-virt-interfaces",
    "t": "istio-inbound-tproxy-mark",
    "r": "istio-inbound-tproxy-route-table",
}
BOOL_FLAGS = ("redirect-dns", "capture-all-dns", "drop-invalid", "dual-stack")
HOSTS = ("v4", "v6", "dual")


@dataclass(frozen=True)
class Invocation:
    argv: tuple[str, ...]  # after `istio-iptables`, without --dry-run
    env: dict[str, str] = field(default_factory=dict)
    host: str = "v4"  # which of HOSTS the pod namespace looks like
    nameservers: tuple[str, ...] = ()  # resolv.conf


ports = st.integers(1, 65535).map(str)
port_ranges = st.tuples(st.integers(1, 65535), st.integers(0, 2000)).map(lambda t: f"{t[0]}:{min(65535, t[0] + t[1])}")
port_items = st.one_of(ports, ports, port_ranges)


def comma_list(items: st.SearchStrategy[str], min_size: int = 0, max_size: int = 4) -> st.SearchStrategy[str]:
    """Istio splits on commas and drops empty items: a trailing comma is allowed and sometimes drawn."""
    joined = st.lists(items, min_size=min_size, max_size=max_size).map(",".join)
    return st.tuples(joined, st.booleans()).map(lambda t: t[0] + "," if t[1] and t[0] else t[0])


def _v4_prefix(draw: st.DrawFn) -> str:
    address = ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
    return f"{address}/{draw(st.integers(0, 32))}"


def _v6_prefix(draw: st.DrawFn) -> str:
    address = ipaddress.IPv6Address(draw(st.sampled_from([0x20010DB8, 0xFD000000, 0xFE800000, 0])) << 96)
    address += draw(st.integers(0, 2**64 - 1))
    return f"{address}/{draw(st.integers(0, 128))}"


@st.composite
def cidr(draw: st.DrawFn) -> str:
    return _v4_prefix(draw) if draw(st.booleans()) else _v6_prefix(draw)


ids = comma_list(st.integers(0, 65534).map(str), min_size=1, max_size=3)
ifnames = comma_list(st.from_regex(r"\A[a-z][a-z0-9]{0,7}\Z"), max_size=3)
marks = st.integers(1, 2**16).map(str)
groups = st.one_of(st.integers(0, 65534).map(str), st.from_regex(r"\A[a-z][a-z0-9_]{0,6}\Z"))


@st.composite
def nameserver(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return str(ipaddress.IPv4Address(draw(st.integers(1, 2**32 - 2))))
    return str(ipaddress.IPv6Address((0xFD00 << 112) + draw(st.integers(1, 2**32))))


def _string_values() -> dict[str, st.SearchStrategy[str]]:
    return {
        "p": ports,
        "z": ports,
        "e": ports,
        "u": ids,
        "g": ids,
        "m": st.sampled_from(["", "REDIRECT", "TPROXY"]),
        "b": st.one_of(st.just("*"), st.just(""), comma_list(port_items)),
        "d": comma_list(port_items),
        "c": ifnames,
        "i": st.one_of(st.just("*"), st.just(""), comma_list(cidr(), max_size=3)),
        "x": comma_list(cidr(), max_size=3),
        "q": comma_list(port_items),
        "o": comma_list(port_items),
        "k": ifnames,
        "t": marks,
        "r": marks,
    }


@st.composite
def valid_invocations(draw: st.DrawFn) -> Invocation:
    argv: list[str] = []
    env: dict[str, str] = {}
    for short, strategy in _string_values().items():
        how = draw(st.sampled_from(["flag", "flag", "long", "env", "absent", "absent"]))
        if how == "absent":
            continue
        value = draw(strategy)
        long = STRING_FLAGS[short]
        if how == "flag":
            argv += [f"-{short}", value]
        elif how == "long":
            argv.append(f"--{long}={value}")
        else:
            env[long.upper().replace("-", "_")] = value
    for name in BOOL_FLAGS:
        how = draw(st.sampled_from(["flag", "env", "absent", "absent"]))
        if how == "flag":
            argv.append(f"--{name}")
        elif how == "env":
            env[name.upper().replace("-", "_")] = draw(st.sampled_from(["true", "false"]))
    if draw(st.booleans()):
        env["ISTIO_META_DNS_CAPTURE"] = draw(st.sampled_from(["true", "false"]))
    if draw(st.booleans()):
        include = draw(st.one_of(st.just("*"), comma_list(groups, min_size=1, max_size=3)))
        env["ISTIO_OUTBOUND_OWNER_GROUPS"] = include
        if include == "*" and draw(st.booleans()):
            env["ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"] = draw(comma_list(groups, min_size=1, max_size=3))
    if draw(st.booleans()):
        third = draw(st.integers(0, 255))
        env["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"] = f"127.0.{third}.1/{draw(st.integers(8, 32))}"
    host = draw(st.sampled_from(HOSTS))
    servers = tuple(draw(st.lists(nameserver(), max_size=3)))
    return Invocation(tuple(argv), env, host, servers)


@st.composite
def rejected_by_both(draw: st.DrawFn) -> tuple[Invocation, str]:
    """Inputs Istio itself refuses, and the name our one-line error must carry: a loopback CIDR that is not an IPv4
    loopback prefix with a mask of 8 to 32 (tools/common/config/validation.go), a CIDR netip.ParsePrefix refuses."""
    if draw(st.booleans()):
        bad = draw(
            st.one_of(
                st.integers(0, 7).map(lambda bits: f"127.0.0.1/{bits}"),
                st.sampled_from(["10.0.0.1/32", "::1/128", "127.0.0.1"]),
                st.from_regex(r"\A[a-z]{1,8}\Z"),
            )
        )
        return Invocation((), {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": bad}), "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"
    flag = draw(st.sampled_from(["i", "x"]))
    bad = draw(
        st.one_of(
            st.integers(33, 64).map(lambda bits: f"10.0.0.0/{bits}"),
            st.integers(129, 200).map(lambda bits: f"fd00::/{bits}"),
            st.sampled_from(["10.0.0.1", "10.0.0.256/8", "fd00::/x"]),
        )
    )
    good = draw(comma_list(cidr(), max_size=2))
    return Invocation((f"-{flag}", f"{good},{bad}" if good else bad)), f"-{flag}/"
