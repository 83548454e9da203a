"""Pure rule generation: `CaptureConfig` -> ordered rule lists -> iptables-restore text, per address family.

The order of rules, and so the text, follows Istio's `capture/run.go` Run() step by step (the conformance goldens
compare it byte for byte). Nothing here touches the machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.iptables.config import DNS_LISTENER_PORT, OUTBOUND_MARK, CaptureConfig, parse_prefix, split

BUILTIN_CHAINS = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING", "ACCEPT", "RETURN", "DROP"})
TABLE_ORDER = ("filter", "mangle", "nat", "raw")
V4 = 4
V6 = 6
_VERSIONED = "$IPVERSION_SPECIFIC"


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    # The whole restore line as tokens: ("-A", chain, ...) or ("-I", chain, "N", ...).
    tokens: tuple[str, ...]

    @property
    def is_insert(self) -> bool:
        return self.tokens[0] == "-I"

    @property
    def spec(self) -> tuple[str, ...]:
        """The match and target part, without the -A/-I chain [pos] prefix (what -C and -D take)."""
        return self.tokens[3:] if self.is_insert else self.tokens[2:]

    def line(self) -> str:
        return " ".join(self.tokens)


@dataclass(frozen=True)
class RuleSet:
    v4: tuple[Rule, ...]
    v6: tuple[Rule, ...]

    def family(self, version: int) -> tuple[Rule, ...]:
        return self.v4 if version == V4 else self.v6


def chains_by_table(rules: Sequence[Rule]) -> dict[str, list[str]]:
    """Non-built-in chains in first-use order, per table (Istio's -N pass, then chains only jumped to)."""
    seen: set[tuple[str, str]] = set()
    result: dict[str, list[str]] = {}
    for rule in rules:
        key = (rule.chain, rule.table)
        if key not in seen:
            seen.add(key)
            if rule.chain not in BUILTIN_CHAINS:
                result.setdefault(rule.table, []).append(rule.chain)
    for rule in rules:
        if len(rule.tokens) >= 2 and rule.tokens[-2] == "-j":
            key = (rule.tokens[-1], rule.table)
            if key not in seen:
                seen.add(key)
                if rule.tokens[-1] not in BUILTIN_CHAINS:
                    result.setdefault(rule.table, []).append(rule.tokens[-1])
    return result


def table_blocks(bodies: Mapping[str, Sequence[str]]) -> list[str]:
    """iptables-restore input from each table's lines: `* table`, its lines, `COMMIT`, tables in TABLE_ORDER; a
    table without lines is left out (each block is one transaction)."""
    lines: list[str] = []
    for table in TABLE_ORDER:
        if bodies.get(table):
            lines += [f"* {table}", *bodies[table], "COMMIT"]
    return lines


def restore_lines(rules: Sequence[Rule], removal: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """iptables-restore input: per table, the `removal` lines, then `-N` lines, then every rule in generation order.
    A chain just flushed and deleted (-F, -X) may be created again (-N) in the same block: one table block is one
    transaction."""
    chains = chains_by_table(rules)
    removal = removal or {}
    return table_blocks(
        {
            table: [
                *removal.get(table, ()),
                *(f"-N {chain}" for chain in chains.get(table, [])),
                *(rule.line() for rule in rules if rule.table == table),
            ]
            for table in TABLE_ORDER
        }
    )


def as_text(lines: Sequence[str]) -> str:
    return "\n".join(lines) + "\n" if lines else ""


def restore_text(rules: Sequence[Rule], removal: Mapping[str, Sequence[str]] | None = None) -> str:
    return as_text(restore_lines(rules, removal))


@dataclass
class _Builder:
    """Collects rules for both families in call order (Istio's IptablesRuleBuilder)."""

    ipv6: bool
    v4: list[Rule] = field(default_factory=list)
    v6: list[Rule] = field(default_factory=list)

    def _add(self, target: list[Rule], chain: str, table: str, position: int | None, params: Sequence[str]) -> None:
        head = ("-A", chain) if position is None else ("-I", chain, str(position))
        target.append(Rule(table, chain, (*head, *params)))

    def append_v4(self, chain: str, table: str, *params: str) -> None:
        self._add(self.v4, chain, table, None, params)

    def append_v6(self, chain: str, table: str, *params: str) -> None:
        if self.ipv6:
            self._add(self.v6, chain, table, None, params)

    def append(self, chain: str, table: str, *params: str) -> None:
        self.append_v4(chain, table, *params)
        self.append_v6(chain, table, *params)

    def insert_v4(self, chain: str, table: str, position: int, *params: str) -> None:
        self._add(self.v4, chain, table, position, params)

    def insert_v6(self, chain: str, table: str, position: int, *params: str) -> None:
        if self.ipv6:
            self._add(self.v6, chain, table, position, params)

    def insert(self, chain: str, table: str, position: int, *params: str) -> None:
        self.insert_v4(chain, table, position, *params)
        self.insert_v6(chain, table, position, *params)

    def append_versioned(self, v4_value: str, v6_value: str, chain: str, table: str, *params: str) -> None:
        self.append_v4(chain, table, *(v4_value if p == _VERSIONED else p for p in params))
        self.append_v6(chain, table, *(v6_value if p == _VERSIONED else p for p in params))


@dataclass(frozen=True)
class _Ranges:
    wildcard: bool = False
    cidrs: tuple[str, ...] = ()
    has_loopback: bool = False


def _separate_v4_v6(value: str) -> tuple[_Ranges, _Ranges]:
    if value.strip() == "*":
        return _Ranges(wildcard=True), _Ranges(wildcard=True)
    found: dict[int, list[str]] = {V4: [], V6: []}
    loop: dict[int, bool] = {V4: False, V6: False}
    for item in split(value):
        prefix = parse_prefix(item, "cidr")
        found[prefix.version].append(_go_prefix_string(prefix))
        loop[prefix.version] |= prefix.ip.is_loopback
    return (_Ranges(False, tuple(found[V4]), loop[V4]), _Ranges(False, tuple(found[V6]), loop[V6]))


def _go_prefix_string(prefix: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str:
    # Go's netip.Prefix.String(): address as given (host bits kept) and the length; RFC 5952 for IPv6, which is
    # also Python's str() of an address.
    return f"{prefix.ip}/{prefix.network.prefixlen}"


def build_rules(cfg: CaptureConfig) -> RuleSet:
    """The ordered rules for each family (`v6` empty unless IPv6 is enabled)."""
    b = _Builder(ipv6=cfg.enable_ipv6)
    loop4 = cfg.host_ipv4_loopback_cidr
    v4_exclude, v6_exclude = _separate_v4_v6(cfg.outbound_ip_ranges_exclude)
    v4_include, v6_include = _separate_v4_v6(cfg.outbound_ip_ranges_include)
    redirect_dns = cfg.redirect_dns and (cfg.capture_all_dns or bool(cfg.dns_servers_v4 or cfg.dns_servers_v6))

    for nic in split(cfg.exclude_interfaces):
        b.append("PREROUTING", "nat", "-i", nic, "-j", "RETURN")
        b.append("OUTPUT", "nat", "-o", nic, "-j", "RETURN")
    if cfg.tproxy:
        for nic in split(cfg.exclude_interfaces):
            b.append("PREROUTING", "mangle", "-i", nic, "-j", "RETURN")
            b.append("OUTPUT", "mangle", "-o", nic, "-j", "RETURN")
    for nic in split(cfg.kube_virt_interfaces):
        b.insert("PREROUTING", "nat", 1, "-i", nic, "-j", "RETURN")
    if cfg.drop_invalid:
        b.append("PREROUTING", "mangle", "-m", "conntrack", "--ctstate", "INVALID", "-j", "ISTIO_DROP")
        b.append("ISTIO_DROP", "mangle", "-j", "DROP")

    b.append("ISTIO_INBOUND", "nat", "-p", "tcp", "--dport", cfg.inbound_tunnel_port, "-j", "RETURN")
    b.append("ISTIO_REDIRECT", "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.proxy_port)
    b.append("ISTIO_IN_REDIRECT", "nat", "-p", "tcp", "-j", "REDIRECT", "--to-ports", cfg.inbound_capture_port)
    _inbound(b, cfg)

    b.append("OUTPUT", "nat", "-j", "ISTIO_OUTPUT")
    for port in split(cfg.outbound_ports_exclude):
        b.append("ISTIO_OUTPUT", "nat", "-p", "tcp", "--dport", port, "-j", "RETURN")
        b.append("ISTIO_OUTPUT", "nat", "-p", "udp", "--dport", port, "-j", "RETURN")
    b.append_versioned("127.0.0.6/32", "::6/128", "ISTIO_OUTPUT", "nat", "-o", "lo", "-s", _VERSIONED, "-j", "RETURN")
    has_loopback = v4_include.has_loopback or v6_include.has_loopback
    uids, gids = split(cfg.proxy_uid), split(cfg.proxy_gid)
    _owner_returns(
        b, cfg, owner="--uid-owner", ids=uids, dns=redirect_dns, dns_multiport=redirect_dns, has_loopback=has_loopback
    )
    _owner_returns(
        b, cfg, owner="--gid-owner", ids=gids, dns=redirect_dns, dns_multiport=False, has_loopback=has_loopback
    )
    _owner_groups(b, cfg)
    if redirect_dns:
        _dns(b, cfg)

    b.append_versioned(loop4, "::1/128", "ISTIO_OUTPUT", "nat", "-d", _VERSIONED, "-j", "RETURN")
    for cidr in v4_exclude.cidrs:
        b.append_v4("ISTIO_OUTPUT", "nat", "-d", cidr, "-j", "RETURN")
    for cidr in v6_exclude.cidrs:
        b.append_v6("ISTIO_OUTPUT", "nat", "-d", cidr, "-j", "RETURN")
    for port in split(cfg.outbound_ports_include):
        b.append("ISTIO_OUTPUT", "nat", "-p", "tcp", "--dport", port, "-j", "ISTIO_REDIRECT")
    _outbound_include(cfg, v4_include, b.append_v4, b.insert_v4)
    _outbound_include(cfg, v6_include, b.append_v6, b.insert_v6)
    if cfg.tproxy:
        _tproxy_marks(b, cfg)
    return RuleSet(tuple(b.v4), tuple(b.v6))


def _inbound(b: _Builder, cfg: CaptureConfig) -> None:
    if not cfg.inbound_ports_include:
        return
    mark = cfg.tproxy_mark
    if cfg.tproxy:
        # Packets of connections Envoy already owns are marked and accepted, so policy routing (mark -> table
        # with a local default route) delivers them to the transparent socket; new ones go through TPROXY.
        b.append("ISTIO_DIVERT", "mangle", "-j", "MARK", "--set-mark", mark)
        b.append("ISTIO_DIVERT", "mangle", "-j", "ACCEPT")
        b.append_versioned(
            cfg.host_ipv4_loopback_cidr, "::1/128", "ISTIO_TPROXY", "mangle", "!", "-d", _VERSIONED, "-p", "tcp",
            "-j", "TPROXY", "--tproxy-mark", f"{mark}/0xffffffff", "--on-port", cfg.inbound_capture_port,
        )  # fmt: skip
        table = "mangle"
    else:
        table = "nat"
    b.append("PREROUTING", table, "-p", "tcp", "-j", "ISTIO_INBOUND")
    if cfg.inbound_ports_include == "*":
        for port in split(cfg.inbound_ports_exclude):
            b.append("ISTIO_INBOUND", table, "-p", "tcp", "--dport", port, "-j", "RETURN")
        if cfg.tproxy:
            established = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ISTIO_DIVERT")
            b.append("ISTIO_INBOUND", "mangle", "-p", "tcp", *established)
            b.append("ISTIO_INBOUND", "mangle", "-p", "tcp", "-j", "ISTIO_TPROXY")
        else:
            b.append("ISTIO_INBOUND", "nat", "-p", "tcp", "-j", "ISTIO_IN_REDIRECT")
        return
    for port in split(cfg.inbound_ports_include):
        if cfg.tproxy:
            established = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ISTIO_DIVERT")
            b.append("ISTIO_INBOUND", "mangle", "-p", "tcp", "--dport", port, *established)
            b.append("ISTIO_INBOUND", "mangle", "-p", "tcp", "--dport", port, "-j", "ISTIO_TPROXY")
        else:
            b.append("ISTIO_INBOUND", "nat", "-p", "tcp", "--dport", port, "-j", "ISTIO_IN_REDIRECT")


def _owner_returns(
    b: _Builder,
    cfg: CaptureConfig,
    *,
    owner: str,
    ids: Sequence[str],
    dns: bool,
    dns_multiport: bool,
    has_loopback: bool,
) -> None:
    """Per uid (or gid): the lo -> inbound redirect for app -> VIP -> itself, the lo RETURN, the owner RETURN.

    With DNS capture the *uid* redirect excludes port 53 via multiport, while the *gid* one keeps `! --dport`
    (Istio's asymmetry, kept for byte-for-byte output); both RETURN rules gain `-p tcp ! --dport 53`.
    """
    for ident in ids:
        if dns_multiport:
            ports: tuple[str, ...] = ("-m", "multiport", "!", "--dports", f"53,{cfg.inbound_tunnel_port}")
        else:
            ports = ("!", "--dport", cfg.inbound_tunnel_port)
        b.append_versioned(
            cfg.host_ipv4_loopback_cidr, "::1/128", "ISTIO_OUTPUT", "nat", "-o", "lo", "!", "-d", _VERSIONED,
            "-p", "tcp", *ports, "-m", "owner", owner, ident, "-j", "ISTIO_IN_REDIRECT",
        )  # fmt: skip
        if not has_loopback:
            not_dns = ("-p", "tcp", "!", "--dport", "53") if dns else ()
            b.append("ISTIO_OUTPUT", "nat", "-o", "lo", *not_dns, "-m", "owner", "!", owner, ident, "-j", "RETURN")
        b.append("ISTIO_OUTPUT", "nat", "-m", "owner", owner, ident, "-j", "RETURN")


def _owner_groups(b: _Builder, cfg: CaptureConfig) -> None:
    # Istio's ParseInterceptFilter: include "*" -> an exclude list ("Except"); otherwise an include list.
    if cfg.owner_groups_include == "*":
        for group in split(cfg.owner_groups_exclude):
            b.append("ISTIO_OUTPUT", "nat", "-m", "owner", "--gid-owner", group, "-j", "RETURN")
        return
    matchers: list[str] = []
    for group in split(cfg.owner_groups_include):
        matchers += ["-m", "owner", "!", "--gid-owner", group]
    b.append("ISTIO_OUTPUT", "nat", *matchers, "-j", "RETURN")


def _dns(b: _Builder, cfg: CaptureConfig) -> None:
    port = DNS_LISTENER_PORT
    b.append("OUTPUT", "raw", "-j", "ISTIO_OUTPUT_DNS")
    if cfg.capture_all_dns or cfg.dns_servers_v4:
        b.append_v4("ISTIO_OUTPUT", "nat", "-j", "ISTIO_OUTPUT_DNS")
    if cfg.capture_all_dns or cfg.dns_servers_v6:
        b.append_v6("ISTIO_OUTPUT", "nat", "-j", "ISTIO_OUTPUT_DNS")
    for proto, to_ports in (("tcp", "--to-ports"), ("udp", "--to-port")):
        if cfg.capture_all_dns:
            b.append("ISTIO_OUTPUT_DNS", "nat", "-p", proto, "--dport", "53", "-j", "REDIRECT", to_ports, port)
            continue
        for server in cfg.dns_servers_v4:
            b.append_v4(
                "ISTIO_OUTPUT_DNS", "nat", "-p", proto, "--dport", "53", "-d", f"{server}/32", "-j", "REDIRECT",
                to_ports, port,
            )  # fmt: skip
        for server in cfg.dns_servers_v6:
            b.append_v6(
                "ISTIO_OUTPUT_DNS", "nat", "-p", proto, "--dport", "53", "-d", f"{server}/128", "-j", "REDIRECT",
                to_ports, port,
            )  # fmt: skip
    # Conntrack zones keep the agent's upstream DNS flows (zone 1) apart from the app's flows to the agent (zone 2),
    # which share the same 5-tuples after REDIRECT and would otherwise race in UDP conntrack.
    for owner, ids in (("--uid-owner", split(cfg.proxy_uid)), ("--gid-owner", split(cfg.proxy_gid))):
        for ident in ids:
            b.append("ISTIO_OUTPUT_DNS", "raw", "-p", "udp", "--dport", "53", "-m", "owner", owner, ident,
                     "-j", "CT", "--zone", "1")  # fmt: skip
            b.append("ISTIO_OUTPUT_DNS", "raw", "-p", "udp", "--sport", port, "-m", "owner", owner, ident,
                     "-j", "CT", "--zone", "2")  # fmt: skip
    if cfg.capture_all_dns:
        b.append("PREROUTING", "raw", "-j", "ISTIO_INBOUND")
        b.append("ISTIO_OUTPUT_DNS", "raw", "-p", "udp", "--dport", "53", "-j", "CT", "--zone", "2")
        b.append("ISTIO_INBOUND", "raw", "-p", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
        return
    per_family = ((cfg.dns_servers_v4, b.append_v4, "/32"), (cfg.dns_servers_v6, b.append_v6, "/128"))
    for servers, append, suffix in per_family:
        if servers:
            append("PREROUTING", "raw", "-j", "ISTIO_INBOUND")
        for server in servers:
            zone2 = ("-d", server + suffix, "-j", "CT", "--zone", "2")
            append("ISTIO_OUTPUT_DNS", "raw", "-p", "udp", "--dport", "53", *zone2)
            zone1 = ("-s", server + suffix, "-j", "CT", "--zone", "1")
            append("ISTIO_INBOUND", "raw", "-p", "udp", "--sport", "53", *zone1)


def _outbound_include(
    cfg: CaptureConfig,
    ranges: _Ranges,
    append: Callable[..., None],
    insert: Callable[..., None],
) -> None:
    if ranges.wildcard:
        append("ISTIO_OUTPUT", "nat", "-j", "ISTIO_REDIRECT")
        for nic in split(cfg.kube_virt_interfaces):
            insert("PREROUTING", "nat", 1, "-i", nic, "-j", "ISTIO_REDIRECT")
        return
    for cidr in ranges.cidrs:
        for nic in split(cfg.kube_virt_interfaces):
            insert("PREROUTING", "nat", 1, "-i", nic, "-d", cidr, "-j", "ISTIO_REDIRECT")
        append("ISTIO_OUTPUT", "nat", "-d", cidr, "-j", "ISTIO_REDIRECT")


def _tproxy_marks(b: _Builder, cfg: CaptureConfig) -> None:
    mark = cfg.tproxy_mark
    loop4 = cfg.host_ipv4_loopback_cidr
    # The mark Envoy's original_src sets on its upstream packets is saved on the connection, so replies from the
    # app can be routed back to Envoy's transparent socket by the policy rule (fwmark -> local table).
    b.append("PREROUTING", "mangle", "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "CONNMARK", "--save-mark")
    b.append("OUTPUT", "mangle", "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", mark, "-j", "RETURN")
    for owner, ids in (("--uid-owner", split(cfg.proxy_uid)), ("--gid-owner", split(cfg.proxy_gid))):
        for ident in ids:
            b.append_versioned(
                loop4, "::1/128", "OUTPUT", "mangle", "!", "-d", _VERSIONED, "-p", "tcp", "-o", "lo",
                "-m", "owner", owner, ident, "-j", "MARK", "--set-mark", OUTBOUND_MARK,
            )  # fmt: skip
    b.append("OUTPUT", "mangle", "-p", "tcp", "-m", "connmark", "--mark", mark, "-j", "CONNMARK", "--restore-mark")
    b.insert("ISTIO_INBOUND", "mangle", 1, "-p", "tcp", "-m", "mark", "--mark", mark, "-j", "RETURN")
    b.insert_v4("ISTIO_INBOUND", "mangle", 2, "-p", "tcp", "-s", "127.0.0.6/32", "-i", "lo", "-j", "RETURN")
    b.insert_v6("ISTIO_INBOUND", "mangle", 2, "-p", "tcp", "-s", "::6/128", "-i", "lo", "-j", "RETURN")
    b.insert("ISTIO_INBOUND", "mangle", 3, "-p", "tcp", "-i", "lo", "-m", "mark", "!", "--mark", OUTBOUND_MARK,
             "-j", "RETURN")  # fmt: skip


def dry_run_transcript(cfg: CaptureConfig, rules: RuleSet) -> list[str]:
    """What Istio's DependenciesStub records: the state reads, each restore stdin line, the final-state reads."""
    lines = ["iptables-save", "ip6tables-save", *restore_lines(rules.v4)]
    if cfg.enable_ipv6:
        lines += restore_lines(rules.v6)
    lines.append("iptables-save")
    if cfg.enable_ipv6:
        lines.append("ip6tables-save")
    return lines
