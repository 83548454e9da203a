"""The lookup table: istiod's NameTable turned into ready-to-send answers, with Istio's rules
(pkg/dns/client/dns.go BuildAlternateHosts, buildDNSAnswers, lookupHost). Pure: no sockets, no clock.

Names a host answers to:
- a Kubernetes host (registry "Kubernetes") in the proxy's cluster domain: `host.`, `name.ns.`, `name.ns.svc.`,
  its deprecated alt_hosts, and the short `name.` when it lives in the proxy's own namespace; a Kubernetes host in
  another domain (a remote cluster): `host.` only;
- any other host (ServiceEntry): `host.` only; `*.example.com` answers any name below example.com;
- each of those names followed by the first search domain of resolv.conf, as a CNAME to the name: a client's
  resolver tries `www.example.com.ns1.svc.cluster.local.` first and gets the answer in one round trip.

A, AAAA and CNAME records have TTL 30 s. A known name without an address of the asked family answers NOERROR with
no records (NXDOMAIN would make a client asking A and AAAA in parallel give up on both; istio#31250). Other query
types, and unknown names, are not answered here (the caller forwards them).

Records are rendered to wire format (by dnspython) when the table is built; a lookup only picks them and reorders
the addresses. A record whose owner is the question itself starts with a compression pointer to offset 12, where
every response carries its one question; so the owner keeps the case the client asked in.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA

from agent.dns.nds_pb2 import NameTable
from agent.dns.wire import name_wire, rdata_wire

log = logging.getLogger("agent.dns")

TTL_SECONDS = 30
KUBERNETES_REGISTRY = "Kubernetes"
QTYPE_A = int(dns.rdatatype.A)
QTYPE_AAAA = int(dns.rdatatype.AAAA)
# A compression pointer to the question's name, which every response carries at offset 12 (right after the header).
QUESTION_NAME_POINTER = b"\xc0\x0c"
_RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, RDLENGTH


@dataclass(frozen=True)
class TableSettings:
    """What, besides the table, decides the names: the proxy's namespace and DNS domain (`--domain`, default
    `<namespace>.svc.cluster.local`), and resolv.conf's search list."""

    proxy_namespace: str = ""
    proxy_domain: str = ""
    search_domains: tuple[str, ...] = ()

    @property
    def domain_parts(self) -> list[str]:
        """The cluster domain without the namespace (`svc.cluster.local`), split: Istio strips a leading label equal
        to the proxy's namespace."""
        parts = self.proxy_domain.split(".")
        if parts and parts[0] == self.proxy_namespace:
            parts = parts[1:]
        return parts


@dataclass
class _Entry:
    """One name's records. `*_tail` omit the owner name (the caller puts the question pointer in front); `*_full`
    carry this name as owner (answers that follow a CNAME to this name)."""

    a_tail: list[bytes] = field(default_factory=list)
    a_full: list[bytes] = field(default_factory=list)
    aaaa_tail: list[bytes] = field(default_factory=list)
    aaaa_full: list[bytes] = field(default_factory=list)
    # Search-domain alias: (target name, the CNAME record without its owner).
    cname: tuple[str, bytes] | None = None


def split_ips(ips: Iterable[str]) -> tuple[list[bytes], list[bytes]]:
    """Packed IPv4 and IPv6 addresses; unparsable entries are skipped (Istio's ParseIPsSplitToV4V6). An IPv4-mapped
    IPv6 address stays IPv6 (an AAAA record), a zone is dropped."""
    v4: list[bytes] = []
    v6: list[bytes] = []
    for text in ips:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        (v4 if address.version == 4 else v6).append(address.packed)
    return v4, v6


def alternate_hosts(hostname: str, info: NameTable.NameInfo, settings: TableSettings) -> set[str]:
    """The names (absolute, as given) that `hostname` answers to (Istio's generateAltHosts for Kubernetes hosts)."""
    if info.registry != KUBERNETES_REGISTRY:
        return {hostname if hostname.endswith(".") else hostname + "."}
    if hostname.endswith("."):
        return set()  # Istio: a Kubernetes host is never written absolute; such an entry answers nothing
    out = {hostname + "."}
    parts = settings.domain_parts
    domain = ".".join(parts)
    # A host of another domain (remote cluster) gets no short forms: name.namespace could clash across clusters.
    if not domain or not hostname.endswith(domain):
        return out
    out.add(f"{info.shortname}.{info.namespace}.")
    if info.namespace == settings.proxy_namespace:
        out.add(f"{info.shortname}.")
    out.add(f"{info.shortname}.{info.namespace}.{parts[0]}.")
    out.update(f"{alt}." for alt in info.alt_hosts)
    return out


def _name_wire(text: str) -> bytes | None:
    """The wire form of an absolute name given as plain text (a hostname: no escapes), None when it is no valid DNS
    name (a label over 63 bytes, an empty label, over 255 bytes)."""
    try:
        return name_wire(dns.name.Name([label.encode() for label in text.split(".")]))
    except (dns.exception.DNSException, UnicodeError):
        return None


def _record_tail(rdata: dns.rdata.Rdata) -> bytes:
    wire = rdata_wire(rdata)
    return _RR_FIXED.pack(rdata.rdtype, dns.rdataclass.IN, TTL_SECONDS, len(wire)) + wire


def _address_tail(packed: bytes) -> bytes:
    text = str(ipaddress.ip_address(packed))
    if len(packed) == 4:
        return _record_tail(dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, text))
    return _record_tail(dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, text))


class LookupTable:
    """Immutable once built; the server swaps in a new one for each NameTable istiod sends."""

    def __init__(self, entries: dict[str, _Entry], shuffle: random.Random | None = None) -> None:
        self._entries = entries
        self._random = shuffle or random.Random()

    @classmethod
    def build(cls, table: NameTable, settings: TableSettings, shuffle: random.Random | None = None) -> LookupTable:
        entries: dict[str, _Entry] = {}
        search = settings.search_domains[0] if settings.search_domains else ""
        # Sorted: where two hosts claim the same name, the outcome does not depend on map order (Istio's does).
        for hostname in sorted(table.table):
            info = table.table[hostname]
            names = alternate_hosts(hostname, info, settings)
            v4, v6 = split_ips(info.ips)
            if not v4 and not v6:
                continue
            a = [_address_tail(p) for p in v4]
            aaaa = [_address_tail(p) for p in v6]
            for name in sorted(names):
                host = name.lower()
                owner = _name_wire(host)
                if owner is None:
                    log.debug("name table: %r is not a valid DNS name, skipped", host)
                    continue
                entry = entries.setdefault(host, _Entry())
                if a:
                    entry.a_tail, entry.a_full = a, [owner + tail for tail in a]
                if aaaa:
                    entry.aaaa_tail, entry.aaaa_full = aaaa, [owner + tail for tail in aaaa]
                if search and not host.endswith(search + "."):
                    alias = (host + search + ("" if search.endswith(".") else ".")).lower()
                    # productpage + ns1.svc.cluster.local is a real name of the host: no alias for it. (An alias
                    # too long to be a DNS name is kept: no query can ask for it.)
                    if alias not in names:
                        # A CNAME's data is the target name, uncompressed.
                        cname = _RR_FIXED.pack(dns.rdatatype.CNAME, dns.rdataclass.IN, TTL_SECONDS, len(owner)) + owner
                        entries.setdefault(alias, _Entry()).cname = (host, cname)
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def lookup(self, qname: str, qtype: int) -> list[bytes] | None:
        """The answer records for `qname` (lower case, absolute) and `qtype`: None when the table does not know the
        name or cannot answer the type (forward it), [] for a known name without such records (NOERROR)."""
        entry = self._entries.get(qname)
        if entry is None:
            # *.svcns.example.com, then *.example.com, ...: the closest wildcard wins.
            labels = qname.split(".")
            for i in range(1, len(labels) - 1):
                entry = self._entries.get("*." + ".".join(labels[i:]))
                if entry is not None:
                    break
            else:
                return None
        if qtype not in (QTYPE_A, QTYPE_AAAA):
            return None  # Istio has no PTR, SRV, ...: the upstream answers them
        if entry.cname is not None:
            target, cname_tail = entry.cname
            resolved = self._entries.get(target)
            if resolved is None:
                return []
            addresses = resolved.a_full if qtype == QTYPE_A else resolved.aaaa_full
            if not addresses:
                return []
            # A chained answer: some clients do not follow a CNAME with another query.
            return [QUESTION_NAME_POINTER + cname_tail, *self._shuffled(addresses)]
        # A wildcard's addresses take the question's name, as an exact match's do.
        tails = entry.a_tail if qtype == QTYPE_A else entry.aaaa_tail
        return [QUESTION_NAME_POINTER + tail for tail in self._shuffled(tails)]

    def _shuffled(self, records: list[bytes]) -> list[bytes]:
        """The addresses in a new order per answer, for DNS load balancing across a headless service's pods (Istio
        shuffles like kube-dns; a rotation by a random offset gives each address the first place as often, and
        costs a fraction of a shuffle)."""
        if len(records) < 2:
            return records
        start = self._random.randrange(len(records))
        return records[start:] + records[:start]


def load_name_table(payload: bytes) -> NameTable:
    """A NameTable from its protobuf bytes (an xDS resource's Any.value). Raises google.protobuf's DecodeError."""
    table = NameTable()
    table.ParseFromString(payload)
    return table


def debug_table(table: NameTable, settings: TableSettings) -> NameTable:
    """What /debug/ndsz shows (Istio's Agent.GetDNSTable): the table as received plus each alternate name of a
    host as an entry of its own (registry Kubernetes, the host's addresses), where the table has no such entry."""
    out = NameTable()
    out.CopyFrom(table)
    for hostname in sorted(table.table):
        info = table.table[hostname]
        v4, v6 = split_ips(info.ips)
        if not v4 and not v6:
            continue
        ips = [str(ipaddress.ip_address(p)) for p in v4 + v6]
        for name in sorted(alternate_hosts(hostname, info, settings)):
            if name not in out.table:
                out.table[name].CopyFrom(NameTable.NameInfo(ips=ips, registry=KUBERNETES_REGISTRY))
    return out


def name_table_from(hosts: Mapping[str, Mapping[str, Any]]) -> NameTable:
    """A NameTable from plain data ({host: {"ips": [...], "registry": ..., ...}}): tests and benchmarks."""
    table = NameTable()
    for host, info in hosts.items():
        table.table[host].CopyFrom(NameTable.NameInfo(**info))
    return table
