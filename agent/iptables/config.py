"""`istio-iptables` configuration: flags and env vars -> one frozen, validated `CaptureConfig`.

Precedence is Istio's (viper): a flag given on the command line wins, even when its value is empty (`-x ""`);
otherwise the env var named after the flag's long name (UPPER_SNAKE, `--inbound-capture-port` ->
`INBOUND_CAPTURE_PORT`; not for `-p`, which Istio binds to no env var); otherwise the default. A few flags also
read an older env var (`--redirect-dns` from `ISTIO_META_DNS_CAPTURE`), which wins when both are set.

Values that end up in rules keep the spelling the user gave (port lists keep their order, as Istio does), but every
one is checked here first: a bad CIDR, port, port range, mode, uid or gid is a `ConfigError` naming the flag or the
env var it came from. Istio (at the pinned version) refuses bad CIDRs and loopback CIDRs too, but writes ports, uids,
marks, modes and interface names into rules unchecked; we refuse those at once (tests/differential pins both).

Host facts that are not flags (is the pod IPv6? which DNS servers are in resolv.conf?) come in as `HostFacts`, so the
pure rule generation never looks at the machine; `detect_host_facts()` is the one place that does.
"""

from __future__ import annotations

import grp
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent.config import env_settings as E
from agent.errors import ConfigError

REDIRECT = "REDIRECT"
TPROXY = "TPROXY"
DEFAULT_PROXY_UID = "1337"
DNS_LISTENER_PORT = "15053"
OUTBOUND_MARK = "1338"


@dataclass(frozen=True)
class FlagSpec:
    """One Istio flag: long name, short letter, default, and the env var(s) it also reads."""

    long: str
    short: str | None
    default: str | bool
    help: str
    # Istio binds an older env var as the *default* of a few flags (e.g. ISTIO_META_DNS_CAPTURE for --redirect-dns).
    fallback_env: tuple[str, ...] = ()
    # Istio binds most flags to their env var (flag.BindEnv), but not all: `-p` is flag.Bind, no env var.
    env_bound: bool = True

    @property
    def env(self) -> str:
        return self.long.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.long.replace("-", "_")

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)


FLAGS: tuple[FlagSpec, ...] = (
    FlagSpec("envoy-port", "p", "15001", "port Envoy listens on for captured outbound TCP", env_bound=False),
    FlagSpec("inbound-capture-port", "z", "15006", "port captured inbound TCP is redirected to"),
    FlagSpec("inbound-tunnel-port", "e", "15008", "HBONE tunnel port, never captured inbound"),
    FlagSpec("proxy-uid", "u", "", "uid(s) whose traffic is not captured (Envoy); default 1337"),
    FlagSpec("proxy-gid", "g", "", "gid(s) whose traffic is not captured; default: same as -u"),
    FlagSpec("istio-inbound-interception-mode", "m", "", "REDIRECT (default) or TPROXY"),
    FlagSpec("istio-inbound-ports", "b", "", "inbound ports to capture, '*' for all, empty for none"),
    FlagSpec("istio-local-exclude-ports", "d", "", "inbound ports not captured when -b is '*'"),
    FlagSpec("istio-exclude-interfaces", "c", "", "interfaces whose traffic is never captured"),
    FlagSpec("istio-service-cidr", "i", "", "outbound CIDRs to capture, '*' for all, empty for none"),
    FlagSpec("istio-service-exclude-cidr", "x", "", "outbound CIDRs never captured"),
    FlagSpec("istio-outbound-ports", "q", "", "outbound ports always captured"),
    FlagSpec("istio-local-outbound-ports-exclude", "o", "", "outbound ports never captured"),
    FlagSpec("kube-virt-interfaces", "k", "", "virtual interfaces whose inbound traffic is treated as outbound"),
    FlagSpec("istio-inbound-tproxy-mark", "t", "1337", "packet mark used in TPROXY mode"),
    FlagSpec("istio-inbound-tproxy-route-table", "r", "133", "routing table used in TPROXY mode"),
    FlagSpec("dry-run", "n", False, "print the iptables transcript instead of applying it"),
    FlagSpec("redirect-dns", None, False, "capture DNS to the agent on 15053", ("ISTIO_META_DNS_CAPTURE",)),
    FlagSpec("drop-invalid", None, False, "drop conntrack-INVALID packets", ("INVALID_DROP",)),
    FlagSpec("dual-stack", None, False, "IPv4 and IPv6 rules when the pod has both", ("ISTIO_DUAL_STACK",)),
    FlagSpec("capture-all-dns", None, False, "capture DNS to any server, not only resolv.conf's"),
    FlagSpec("cleanup-only", None, False, "remove the rules this command installs, then exit"),
    FlagSpec("reconcile", None, False, "replace existing Istio chains that differ from the requested ones"),
    FlagSpec("force-apply", None, False, "replace existing Istio chains even when they look the same"),
    FlagSpec("skip-rule-apply", None, False, "do not touch iptables (with --run-validation only)"),
    FlagSpec("run-validation", None, False, "validate the rules with a probe connection (not supported here)"),
)


# Environment-only settings, declared in agent/config/env_settings.py.
LOOPBACK_CIDR = E.ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR
OWNER_GROUPS = E.ISTIO_OUTBOUND_OWNER_GROUPS
OWNER_GROUPS_EXCLUDE = E.ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE

_TRUE = {"1", "t", "true", "y", "yes", "on"}
_FALSE = {"0", "f", "false", "n", "no", "off", ""}
_IFNAME = re.compile(r"^[^\s/:,]{1,15}$")
# ASCII only, as Go's strconv: str.isdigit() is true for "²", which int() then refuses (a traceback, not exit 78).
_DIGITS = re.compile(r"[0-9]+")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_GID_OR_RANGE = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")
# Istio's ValidateOwnerGroups: the include list becomes one rule with a match per group.
MAX_OWNER_GROUPS_INCLUDE = 64
# Routing tables the kernel reserves: 0 unspec (the kernel picks main), 253 default, 254 main, 255 local.
RESERVED_ROUTE_TABLES = frozenset({0, 253, 254, 255})


@dataclass(frozen=True)
class HostFacts:
    """What Istio reads from the machine rather than from flags."""

    ipv6: bool = False
    # Raw server addresses as written in resolv.conf (only read with --redirect-dns and without --capture-all-dns).
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaptureConfig:
    proxy_port: str = "15001"
    inbound_capture_port: str = "15006"
    inbound_tunnel_port: str = "15008"
    proxy_uid: str = DEFAULT_PROXY_UID
    proxy_gid: str = DEFAULT_PROXY_UID
    mode: str = REDIRECT
    inbound_ports_include: str = ""
    inbound_ports_exclude: str = ""
    exclude_interfaces: str = ""
    outbound_ip_ranges_include: str = ""
    outbound_ip_ranges_exclude: str = ""
    outbound_ports_include: str = ""
    outbound_ports_exclude: str = ""
    kube_virt_interfaces: str = ""
    tproxy_mark: str = "1337"
    tproxy_route_table: str = "133"
    owner_groups_include: str = "*"
    owner_groups_exclude: str = ""
    host_ipv4_loopback_cidr: str = "127.0.0.1/32"
    dry_run: bool = False
    redirect_dns: bool = False
    drop_invalid: bool = False
    dual_stack: bool = False
    capture_all_dns: bool = False
    cleanup_only: bool = False
    reconcile: bool = False
    force_apply: bool = False
    skip_rule_apply: bool = False
    run_validation: bool = False
    enable_ipv6: bool = False
    dns_servers_v4: tuple[str, ...] = field(default=())
    dns_servers_v6: tuple[str, ...] = field(default=())

    @property
    def tproxy(self) -> bool:
        return self.mode == TPROXY


def split(value: str) -> list[str]:
    """Istio's config.Split: comma separated, surrounding blanks trimmed, empty items dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_bool(raw: str, source: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(source, "", f"not a boolean: {raw!r} (use true or false)")


def _check_port(value: str, source: str, allow_range: bool) -> None:
    parts = value.split(":") if allow_range else [value]
    if len(parts) > 2 or not all(_DIGITS.fullmatch(p) for p in parts):
        kind = "port or port range (N or N:M)" if allow_range else "port"
        raise ConfigError(source, "", f"not a valid {kind}: {value!r}")
    numbers = [int(p) for p in parts]
    if not all(0 < n <= 65535 for n in numbers):
        raise ConfigError(source, "", f"port out of range 1-65535: {value!r}")
    if len(numbers) == 2 and numbers[0] > numbers[1]:
        raise ConfigError(source, "", f"port range is reversed: {value!r}")


def _check_port_list(value: str, source: str, wildcard: bool = False) -> None:
    if wildcard and value.strip() == "*":
        return
    for item in split(value):
        _check_port(item, source, allow_range=True)


def _check_cidr_list(value: str, source: str, wildcard: bool) -> None:
    if value.strip() == "*":
        if wildcard:
            return
        raise ConfigError(source, "", "'*' is not allowed here (Istio: invalid value for OUTBOUND_IP_RANGES_EXCLUDE)")
    for item in split(value):
        parse_prefix(item, source)


def parse_prefix(value: str, source: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """Go's netip.ParsePrefix: an address and a mandatory length; host bits are kept, not masked."""
    if "/" not in value:
        raise ConfigError(source, "", f"not a CIDR (address/length): {value!r}")
    try:
        return ipaddress.ip_interface(value)
    except ValueError as exc:
        raise ConfigError(source, "", f"not a CIDR: {value!r} ({exc})") from None


def _check_loopback_cidr(value: str, source: str) -> None:
    """Istio's ValidateIPv4LoopbackCidr: an IPv4 loopback address, mask 8 to 32."""
    prefix = parse_prefix(value, source)
    if prefix.version != 4 or not prefix.ip.is_loopback:
        raise ConfigError(source, "", f"not an IPv4 loopback CIDR: {value!r}")
    if not 8 <= prefix.network.prefixlen <= 32:
        raise ConfigError(source, "", f"mask of {value!r} is not in the range 8 to 32")


def _check_id_list(value: str, source: str, what: str) -> None:
    items = split(value)
    if not items:
        raise ConfigError(source, "", f"no {what} given")
    for item in items:
        if not _DIGITS.fullmatch(item) or int(item) >= 2**32 - 1:
            raise ConfigError(source, "", f"not a numeric {what}: {item!r}")


def _check_uint(value: str, source: str, bits: int = 32) -> None:
    if not _DIGITS.fullmatch(value) or int(value) >= 2**bits:
        raise ConfigError(source, "", f"not an unsigned integer: {value!r}")


def _check_ifnames(value: str, source: str) -> None:
    for item in split(value):
        if not _IFNAME.match(item):
            raise ConfigError(source, "", f"not an interface name: {item!r}")


def _check_owner_groups(value: str, source: str, wildcard: bool) -> None:
    """A gid, a gid range (N-M, as iptables' owner match takes) or a group name; names are resolved only before
    rules are applied (`check_group_names`), where iptables resolves them."""
    if wildcard and value.strip() == "*":
        return
    for item in split(value):
        numeric = _GID_OR_RANGE.fullmatch(item)
        if numeric is not None:
            ids = [int(g) for g in numeric.groups() if g is not None]
            if max(ids) >= 2**32 - 1 or ids != sorted(ids):
                raise ConfigError(source, "", f"not a gid or an ordered gid range: {item!r}")
        elif not _GROUP_NAME.fullmatch(item):
            raise ConfigError(source, "", f"not a group name or gid: {item!r}")


def group_names(cfg: CaptureConfig) -> list[tuple[str, str]]:
    """(env var, name) for every owner group given by name rather than by gid."""
    lists = ((OWNER_GROUPS.name, cfg.owner_groups_include), (OWNER_GROUPS_EXCLUDE.name, cfg.owner_groups_exclude))
    return [
        (env_name, item)
        for env_name, value in lists
        if value != "*"
        for item in split(value)
        if not _GID_OR_RANGE.fullmatch(item)
    ]


def check_group_names(cfg: CaptureConfig) -> None:
    """Before rules are applied: every group name must exist here, where iptables-restore will look it up (a name
    it cannot resolve fails the restore half way: Istio exits 1 after the nat table is refused)."""
    for env_name, name in group_names(cfg):
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ConfigError(f"env {env_name}", "", f"no group named {name!r} in this container") from None


def _check_tproxy_numbers(mark: str, table: str, where: Mapping[str, str]) -> None:
    """TPROXY only. Mark 0 matches every unmarked packet (and `ip rule add fwmark 0` is a rule for all traffic);
    the reserved tables would put a local default route into main or local. Istio accepts both."""
    if int(mark) == 0:
        raise ConfigError(where["istio_inbound_tproxy_mark"], "", "mark 0 would match every unmarked packet")
    if int(table) in RESERVED_ROUTE_TABLES:
        raise ConfigError(
            where["istio_inbound_tproxy_route_table"],
            "",
            f"table {table} is reserved by the kernel (0 unspec, 253 default, 254 main, 255 local)",
        )


class _Sources:
    """Resolves each flag to (value, source-name) with Istio's precedence."""

    def __init__(self, given: Mapping[str, object], env: Mapping[str, str]) -> None:
        self.given = given
        self.env = env

    def get(self, spec: FlagSpec) -> tuple[str | bool, str]:
        flag_name = f"--{spec.long}" if spec.short is None else f"-{spec.short}/--{spec.long}"
        value = self.given.get(spec.dest)
        if value is not None:
            return value if isinstance(value, bool) else str(value), f"flag {flag_name}"
        # Istio sets the flag from its env var, then from each additional env var: the last one set wins.
        for env_name in reversed((spec.env,) * spec.env_bound + spec.fallback_env):
            if env_name in self.env:
                raw = self.env[env_name]
                source = f"env {env_name}"
                return (parse_bool(raw, source) if spec.is_bool else raw), source
        return spec.default, f"flag {flag_name} (default)"


def build_config(given: Mapping[str, object], env: Mapping[str, str], host: HostFacts) -> CaptureConfig:
    """Flags actually given (`None` = not given), the environment and the host facts -> a validated config."""
    sources = _Sources(given, env)
    values: dict[str, object] = {}
    where: dict[str, str] = {}
    for spec in FLAGS:
        values[spec.dest], where[spec.dest] = sources.get(spec)

    def text(dest: str) -> str:
        value = values[dest]
        assert isinstance(value, str)
        return value.strip()

    for dest in ("envoy_port", "inbound_capture_port", "inbound_tunnel_port"):
        _check_port(text(dest), where[dest], allow_range=False)
    mode = text("istio_inbound_interception_mode") or REDIRECT
    if mode not in (REDIRECT, TPROXY):
        raise ConfigError(
            where["istio_inbound_interception_mode"], "", f"mode must be REDIRECT or TPROXY, not {mode!r}"
        )
    uid = text("proxy_uid") or DEFAULT_PROXY_UID
    _check_id_list(uid, where["proxy_uid"], "uid")
    gid = text("proxy_gid") or uid
    _check_id_list(gid, where["proxy_gid"], "gid")
    _check_port_list(text("istio_inbound_ports"), where["istio_inbound_ports"], wildcard=True)
    _check_port_list(text("istio_local_exclude_ports"), where["istio_local_exclude_ports"])
    _check_port_list(text("istio_outbound_ports"), where["istio_outbound_ports"])
    _check_port_list(text("istio_local_outbound_ports_exclude"), where["istio_local_outbound_ports_exclude"])
    _check_cidr_list(text("istio_service_cidr"), where["istio_service_cidr"], wildcard=True)
    _check_cidr_list(text("istio_service_exclude_cidr"), where["istio_service_exclude_cidr"], wildcard=False)
    _check_ifnames(text("istio_exclude_interfaces"), where["istio_exclude_interfaces"])
    _check_ifnames(text("kube_virt_interfaces"), where["kube_virt_interfaces"])
    _check_uint(text("istio_inbound_tproxy_mark"), where["istio_inbound_tproxy_mark"])
    _check_uint(text("istio_inbound_tproxy_route_table"), where["istio_inbound_tproxy_route_table"])
    if mode == TPROXY:
        _check_tproxy_numbers(text("istio_inbound_tproxy_mark"), text("istio_inbound_tproxy_route_table"), where)

    loopback = LOOPBACK_CIDR.read(env)
    _check_loopback_cidr(loopback, LOOPBACK_CIDR.source)
    groups_include = OWNER_GROUPS.read(env)
    groups_exclude = OWNER_GROUPS_EXCLUDE.read(env)
    _check_owner_groups(groups_include, OWNER_GROUPS.source, wildcard=True)
    _check_owner_groups(groups_exclude, OWNER_GROUPS_EXCLUDE.source, wildcard=False)
    if groups_include != "*" and len(split(groups_include)) > MAX_OWNER_GROUPS_INCLUDE:
        raise ConfigError(
            OWNER_GROUPS.source,
            "",
            f"at most {MAX_OWNER_GROUPS_INCLUDE} groups (Istio's limit), got {len(split(groups_include))}",
        )
    if groups_include != "*" and groups_exclude:
        raise ConfigError(
            OWNER_GROUPS_EXCLUDE.source, "", f"cannot be combined with {OWNER_GROUPS.name}={groups_include!r}"
        )

    def flag(dest: str) -> bool:
        return bool(values[dest])

    return CaptureConfig(
        proxy_port=text("envoy_port"),
        inbound_capture_port=text("inbound_capture_port"),
        inbound_tunnel_port=text("inbound_tunnel_port"),
        proxy_uid=uid,
        proxy_gid=gid,
        mode=mode,
        inbound_ports_include=text("istio_inbound_ports"),
        inbound_ports_exclude=text("istio_local_exclude_ports"),
        exclude_interfaces=text("istio_exclude_interfaces"),
        outbound_ip_ranges_include=text("istio_service_cidr"),
        outbound_ip_ranges_exclude=text("istio_service_exclude_cidr"),
        outbound_ports_include=text("istio_outbound_ports"),
        outbound_ports_exclude=text("istio_local_outbound_ports_exclude"),
        kube_virt_interfaces=text("kube_virt_interfaces"),
        tproxy_mark=text("istio_inbound_tproxy_mark"),
        tproxy_route_table=text("istio_inbound_tproxy_route_table"),
        owner_groups_include=groups_include,
        owner_groups_exclude=groups_exclude,
        host_ipv4_loopback_cidr=loopback,
        dry_run=flag("dry_run"),
        redirect_dns=flag("redirect_dns"),
        drop_invalid=flag("drop_invalid"),
        dual_stack=flag("dual_stack"),
        capture_all_dns=flag("capture_all_dns"),
        cleanup_only=flag("cleanup_only"),
        reconcile=flag("reconcile"),
        force_apply=flag("force_apply"),
        skip_rule_apply=flag("skip_rule_apply"),
        run_validation=flag("run_validation"),
        enable_ipv6=host.ipv6,
        dns_servers_v4=host.dns_servers_v4,
        dns_servers_v6=host.dns_servers_v6,
    )


def parse_resolv_conf(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`nameserver` lines -> (v4, v6) in file order, canonicalised like Go's netip.Addr.String()."""
    v4: list[str] = []
    v6: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(words[1].split("%")[0])
            except ValueError:
                continue
            (v4 if addr.version == 4 else v6).append(str(addr))
    return tuple(v4), tuple(v6)


def detect_host_facts(dual_stack: bool, read_dns: bool, resolv_conf: Path = Path("/etc/resolv.conf")) -> HostFacts:
    """Istio's getLocalIP + resolv.conf read. IPv6 is on when the first usable address is IPv6 (any, with
    --dual-stack). A namespace with no usable address is IPv4-only here (Istio panics instead)."""
    usable: list[int] = []
    for addrs in psutil.net_if_addrs().values():
        for snic in sorted(addrs, key=lambda a: a.family != socket.AF_INET):
            if snic.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                addr = ipaddress.ip_address(snic.address.split("%")[0])
            except ValueError:
                continue
            if not (addr.is_loopback or addr.is_link_local or addr.is_multicast):
                usable.append(addr.version)
    ipv6 = (6 in usable) if dual_stack else (usable[:1] == [6])
    v4: tuple[str, ...] = ()
    v6: tuple[str, ...] = ()
    if read_dns:
        try:
            v4, v6 = parse_resolv_conf(resolv_conf.read_text())
        except OSError as exc:
            raise ConfigError(str(resolv_conf), "nameserver", f"cannot read: {exc.strerror}") from None
    return HostFacts(ipv6=ipv6, dns_servers_v4=v4, dns_servers_v6=v6)
