"""Istio's own DNS proxy test fixture and cases (pkg/dns/client/dns_test.go fillTable / testDNS), as data: the
table tests, the server tests and the differential test against Istio's agent all use them."""

from __future__ import annotations

from typing import Any

from agent.dns.table import TableSettings

NAMESPACE = "ns1"
DOMAIN = "ns1.svc.cluster.local"
SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")
SETTINGS = TableSettings(NAMESPACE, DOMAIN, SEARCH)

TABLE: dict[str, dict[str, Any]] = {
    "www.google.com": {"ips": ["1.1.1.1"], "registry": "External"},
    "productpage.ns1.svc.cluster.local": {
        "ips": ["9.9.9.9"], "registry": "Kubernetes", "namespace": "ns1", "shortname": "productpage",
    },
    "example.ns2.svc.cluster.local": {
        "ips": ["10.10.10.10"], "registry": "Kubernetes", "namespace": "ns2", "shortname": "example",
    },
    "details.ns2.svc.cluster.remote": {
        "ips": ["11.11.11.11", "12.12.12.12", "13.13.13.13", "14.14.14.14"],
        "registry": "Kubernetes", "namespace": "ns2", "shortname": "details",
    },
    "svc-with-alt.ns1.svc.cluster.local": {
        "ips": ["15.15.15.15"], "registry": "Kubernetes", "namespace": "ns1", "shortname": "svc-with-alt",
        "alt_hosts": ["svc-with-alt.ns1.svc.clusterset.local"],
    },
    "ipv6.localhost": {"ips": ["2001:db8:0:0:0:ff00:42:8329"], "registry": "External"},
    "dual.localhost": {"ips": ["2.2.2.2", "2001:db8:0:0:0:ff00:42:8329"], "registry": "External"},
    "ipv4.localhost": {"ips": ["2.2.2.2"], "registry": "External"},
    "*.b.wildcard": {"ips": ["11.11.11.11"], "registry": "External"},
    "*.wildcard": {"ips": ["10.10.10.10"], "registry": "External"},
    "*.svc.mesh.company.net": {"ips": ["10.1.2.3"], "registry": "External"},
    "example.localhost.": {"ips": ["3.3.3.3"], "registry": "External"},
}  # fmt: skip

Record = tuple[str, str, str]  # (owner, type, data), lower case
FORWARD = None  # not in the table: the upstream answers

# (question, type, expected records or FORWARD). Records compare as a set (addresses come in a random order), with
# the CNAME first when there is one.
CASES: list[tuple[str, str, list[Record] | None]] = [
    ("www.google.com.", "A", [("www.google.com.", "A", "1.1.1.1")]),
    ("www.google.com.ns1.svc.cluster.local.", "A", [
        ("www.google.com.ns1.svc.cluster.local.", "CNAME", "www.google.com."),
        ("www.google.com.", "A", "1.1.1.1"),
    ]),
    ("www.bing.com.", "A", FORWARD),
    ("productpage.ns1.svc.cluster.local.", "A", [("productpage.ns1.svc.cluster.local.", "A", "9.9.9.9")]),
    # The full name plus the first search domain is no name of the host: forwarded.
    ("productpage.ns1.svc.cluster.local.ns1.svc.cluster.local.", "A", FORWARD),
    ("productpage.ns1.", "A", [("productpage.ns1.", "A", "9.9.9.9")]),
    ("productpage.", "A", [("productpage.", "A", "9.9.9.9")]),
    ("productpage.ns1.ns1.svc.cluster.local.", "A", [
        ("productpage.ns1.ns1.svc.cluster.local.", "CNAME", "productpage.ns1."),
        ("productpage.ns1.", "A", "9.9.9.9"),
    ]),
    ("productpage.ns1.ns1.svc.cluster.local.", "AAAA", []),
    ("example.ns2.", "A", [("example.ns2.", "A", "10.10.10.10")]),
    ("example.ns2.svc.cluster.local.", "A", [("example.ns2.svc.cluster.local.", "A", "10.10.10.10")]),
    ("example.ns2.svc.", "A", [("example.ns2.svc.", "A", "10.10.10.10")]),
    # A short name answers only in the proxy's own namespace.
    ("example.", "A", FORWARD),
    ("svc-with-alt.", "A", [("svc-with-alt.", "A", "15.15.15.15")]),
    ("svc-with-alt.ns1.", "A", [("svc-with-alt.ns1.", "A", "15.15.15.15")]),
    ("svc-with-alt.ns1.svc.", "A", [("svc-with-alt.ns1.svc.", "A", "15.15.15.15")]),
    ("svc-with-alt.ns1.svc.cluster.local.", "A", [("svc-with-alt.ns1.svc.cluster.local.", "A", "15.15.15.15")]),
    ("svc-with-alt.ns1.svc.clusterset.local.", "A", [
        ("svc-with-alt.ns1.svc.clusterset.local.", "A", "15.15.15.15"),
    ]),
    ("details.ns2.svc.cluster.remote.", "A", [
        ("details.ns2.svc.cluster.remote.", "A", f"{i}.{i}.{i}.{i}") for i in (11, 12, 13, 14)
    ]),
    # A Kubernetes host of another cluster domain gets no short forms.
    ("details.ns2.", "A", FORWARD),
    ("dual.localhost.", "A", [("dual.localhost.", "A", "2.2.2.2")]),
    ("dual.localhost.", "AAAA", [("dual.localhost.", "AAAA", "2001:db8::ff00:42:8329")]),
    ("foo.wildcard.", "A", [("foo.wildcard.", "A", "10.10.10.10")]),
    ("a.b.wildcard.", "A", [("a.b.wildcard.", "A", "11.11.11.11")]),
    ("foo.wildcard.ns1.svc.cluster.local.", "A", [
        ("foo.wildcard.ns1.svc.cluster.local.", "CNAME", "*.wildcard."),
        ("*.wildcard.", "A", "10.10.10.10"),
    ]),
    ("foo.svc.mesh.company.net.", "A", [("foo.svc.mesh.company.net.", "A", "10.1.2.3")]),
    ("foo.foons.svc.mesh.company.net.", "A", [("foo.foons.svc.mesh.company.net.", "A", "10.1.2.3")]),
    ("foo.svc.mesh.company.net.ns1.svc.cluster.local.", "A", [
        ("foo.svc.mesh.company.net.ns1.svc.cluster.local.", "CNAME", "*.svc.mesh.company.net."),
        ("*.svc.mesh.company.net.", "A", "10.1.2.3"),
    ]),
    # A known name without an address of the asked family: NOERROR, no records (not NXDOMAIN).
    ("ipv6.localhost.", "A", []),
    ("ipv4.localhost.", "AAAA", []),
    ("example.localhost.", "A", [("example.localhost.", "A", "3.3.3.3")]),
    # Types other than A and AAAA go upstream even for a known name.
    ("www.google.com.", "MX", FORWARD),
    ("productpage.", "TXT", FORWARD),
]  # fmt: skip
