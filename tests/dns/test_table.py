"""The lookup table alone: Istio's cases (pkg/dns/client/dns_test.go) and the rules around them."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.rdatatype
import pytest

from agent.dns.table import TTL_SECONDS, LookupTable, TableSettings, alternate_hosts, debug_table, name_table_from
from agent.dns.wire import NOERROR, QueryReader, reply
from tests.dns.istio_cases import CASES, SETTINGS, TABLE, Record


def answer(table: LookupTable, name: str, rdtype: str) -> dns.message.Message | None:
    """The reply the proxy builds from the table (parsed back by dnspython), or None when it would forward."""
    request = dns.message.make_query(name, rdtype).to_wire()
    query = QueryReader().read(request)
    records = table.lookup(query.name, query.rdtype)  # type: ignore[union-attr]
    if records is None:
        return None
    return dns.message.from_wire(reply(request, query, NOERROR, records, authoritative=True))  # type: ignore[arg-type]


def records_of(message: dns.message.Message) -> list[Record]:
    return [
        (rrset.name.to_text().lower(), dns.rdatatype.to_text(rrset.rdtype), rdata.to_text().lower())
        for rrset in message.answer
        for rdata in rrset
    ]


@pytest.fixture(scope="module")
def table() -> LookupTable:
    return LookupTable.build(name_table_from(TABLE), SETTINGS)


@pytest.mark.parametrize(("name", "rdtype", "expected"), CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_istio_cases(table: LookupTable, name: str, rdtype: str, expected: list[Record] | None) -> None:
    message = answer(table, name, rdtype)
    if expected is None:
        assert message is None
        return
    assert message is not None
    got = records_of(message)
    assert sorted(got) == sorted(expected)
    if expected and expected[0][1] == "CNAME":
        assert got[0] == expected[0], "the CNAME comes first in a chained answer"
    assert message.rcode() == NOERROR
    assert message.flags & dns.flags.AA
    for rrset in message.answer:
        assert rrset.ttl == TTL_SECONDS
        assert rrset.rdclass == dns.rdataclass.IN


def test_owner_keeps_the_case_the_client_asked_in(table: LookupTable) -> None:
    message = answer(table, "WWW.Google.COM.", "A")
    assert message is not None
    assert [rrset.name.to_text() for rrset in message.answer] == ["WWW.Google.COM."]
    assert records_of(message) == [("www.google.com.", "A", "1.1.1.1")]


def test_addresses_rotate_between_answers(table: LookupTable) -> None:
    firsts = set()
    for _ in range(200):
        message = answer(table, "details.ns2.svc.cluster.remote.", "A")
        assert message is not None
        firsts.add(records_of(message)[0][2])
    assert firsts == {"11.11.11.11", "12.12.12.12", "13.13.13.13", "14.14.14.14"}


def test_alternate_names_as_istio_builds_them() -> None:
    """Istio's TestBuildAlternateHosts: the names /debug/ndsz lists for each host."""
    names = set(debug_table(name_table_from(TABLE), SETTINGS).table)
    expected = {
        "www.google.com": {"www.google.com", "www.google.com."},
        "example": {"example.ns2.", "example.ns2.svc.", "example.localhost.", "example.ns2.svc.cluster.local.",
                    "example.ns2.svc.cluster.local"},
        "details": {"details.ns2.svc.cluster.remote", "details.ns2.svc.cluster.remote."},
        "productpage": {"productpage.ns1.svc.cluster.local.", "productpage.", "productpage.ns1.svc.cluster.local",
                        "productpage.ns1.", "productpage.ns1.svc."},
        "svc-with-alt": {"svc-with-alt.", "svc-with-alt.ns1.", "svc-with-alt.ns1.svc.",
                         "svc-with-alt.ns1.svc.clusterset.local.", "svc-with-alt.ns1.svc.cluster.local.",
                         "svc-with-alt.ns1.svc.cluster.local"},
        "*.wildcard": {"*.wildcard", "*.wildcard."},
        "example.localhost.": {"example.localhost."},
    }  # fmt: skip
    for prefix, wanted in expected.items():
        assert {n for n in names if n.startswith(prefix)} == wanted, prefix


def test_debug_table_entries_carry_the_host_addresses() -> None:
    shown = debug_table(name_table_from(TABLE), SETTINGS)
    assert list(shown.table["productpage."].ips) == ["9.9.9.9"]
    assert shown.table["productpage."].registry == "Kubernetes"
    assert list(shown.table["dual.localhost."].ips) == ["2.2.2.2", "2001:db8::ff00:42:8329"]


def test_no_short_names_without_a_domain() -> None:
    info = name_table_from(TABLE).table["productpage.ns1.svc.cluster.local"]
    assert alternate_hosts("productpage.ns1.svc.cluster.local", info, TableSettings("ns1", "")) == {
        "productpage.ns1.svc.cluster.local."
    }


def test_a_kubernetes_host_written_absolute_answers_nothing() -> None:
    """Istio's generateAltHosts returns no name for it; such an entry is never sent by istiod."""
    table = LookupTable.build(
        name_table_from({"a.ns1.svc.cluster.local.": {"ips": ["1.2.3.4"], "registry": "Kubernetes"}}), SETTINGS
    )
    assert len(table) == 0


def test_unusable_entries_are_skipped_not_fatal() -> None:
    table = LookupTable.build(
        name_table_from(
            {
                "no-ips.example.com": {"ips": ["not-an-ip", "300.1.1.1", "01.2.3.4"], "registry": "External"},
                "x" * 64 + ".example.com": {"ips": ["1.2.3.4"], "registry": "External"},
                "ok.example.com": {"ips": ["bogus", "5.6.7.8", "fe80::1%eth0", "::ffff:1.2.3.4"], "registry": "X"},
            }
        ),
        TableSettings(),
    )
    assert "no-ips.example.com." not in table
    assert len(table) == 1
    a = answer(table, "ok.example.com.", "A")
    aaaa = answer(table, "ok.example.com.", "AAAA")
    assert a is not None and aaaa is not None
    assert [r[2] for r in records_of(a)] == ["5.6.7.8"]
    assert sorted(r[2] for r in records_of(aaaa)) == ["::ffff:1.2.3.4", "fe80::1"]


def test_search_domain_with_trailing_dot() -> None:
    table = LookupTable.build(
        name_table_from({"db.example.com": {"ips": ["1.2.3.4"], "registry": "External"}}),
        TableSettings("ns1", "ns1.svc.cluster.local", ("ns1.svc.cluster.local.",)),
    )
    message = answer(table, "db.example.com.ns1.svc.cluster.local.", "A")
    assert message is not None
    assert records_of(message)[0] == ("db.example.com.ns1.svc.cluster.local.", "CNAME", "db.example.com.")


def test_where_two_hosts_claim_a_name_the_outcome_is_stable() -> None:
    hosts = {
        "a.ns2.svc.cluster.local": {"ips": ["1.1.1.1"], "registry": "Kubernetes", "namespace": "ns2", "shortname": "a"},
        "a.ns2.": {"ips": ["2.2.2.2"], "registry": "External"},
    }
    outcomes = set()
    for order in (list(hosts), list(reversed(hosts))):
        table = LookupTable.build(name_table_from({h: hosts[h] for h in order}), SETTINGS, random.Random(0))
        message = answer(table, "a.ns2.", "A")
        assert message is not None
        outcomes.add(tuple(records_of(message)))
    assert len(outcomes) == 1
