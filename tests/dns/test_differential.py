"""The Python DNS proxy and Istio's, asked the same queries, give the same answers.

Istio's side is its own DNS proxy code (pkg/dns/client, what its pilot-agent runs; tests/dns/istio_dns), built
with Go. Both run in one pod network namespace with the same name table (Istio's test table) and the same
resolv.conf, whose server is the scripted resolver in the client namespace; the queries are sent from inside the
pod (tests/dns/ask.py) over UDP and TCP. Replies are compared whole (id, flags, rcode, every section), with two
normalisations: record order within a section (both shuffle addresses) and the case of owner names (Istio
lower-cases them, the Python proxy keeps the client's case, which DNS treats as equal).
"""

from __future__ import annotations

import json
import random
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dns.message
import dns.opcode
import dns.rdataclass
import dns.rdatatype
import pytest

from tests.conftest import require_root
from tests.dns.compare import normalized, query_wire
from tests.dns.istio_cases import CASES, DOMAIN, NAMESPACE, SEARCH, TABLE
from tests.dns.istio_dns import istio_dns_binary
from tests.dns.processes import wait_ready
from tests.dns.run_proxy import table_json
from tests.support.netns import PodNetwork, Process, pod_network

pytestmark = [pytest.mark.root, pytest.mark.netns]

PYTHON_PORT = 15053
ISTIO_PORT = 25053
FORWARD_TIMEOUT = "500ms"
UPSTREAM_RECORDS = ["www.bing.com=1.1.1.1", "real.example.test=10.30.0.1", "real.example.test=fd00::30"]


def queries() -> list[tuple[str, str, bytes]]:
    """(label, protocol, wire) of every query both proxies are asked."""
    asked: list[tuple[str, str, bytes]] = []
    for protocol in ("udp", "tcp"):
        for name, rdtype, _ in CASES:
            asked.append((f"{name} {rdtype}", protocol, query_wire(name, rdtype)))
        extra = [
            ("case", query_wire("WWW.Google.COM.", "A")),
            ("edns", query_wire("productpage.ns1.svc.cluster.local.", "A", use_edns=0, payload=1232)),
            ("forwarded aaaa", query_wire("real.example.test.", "AAAA")),
            ("nxdomain", query_wire("nowhere.example.test.", "A")),
            ("giant", query_wire("giant.test.", "A")),
            ("giant edns", query_wire("giant.test.", "A", use_edns=0, payload=4096)),
            ("silent", query_wire("silent.test.", "A")),
            ("ptr", query_wire("9.9.9.9.in-addr.arpa.", "PTR")),
            ("any", query_wire("www.google.com.", "ANY")),
            ("chaos", query_wire("version.bind.", "TXT", rdclass=dns.rdataclass.CH)),
            ("no rd", query_wire("productpage.", "A", flags=0)),
        ]
        asked += [(label, protocol, wire) for label, wire in extra]
    notify = dns.message.make_query("productpage.", "A")
    notify.set_opcode(dns.opcode.NOTIFY)
    valid = query_wire("www.google.com.", "A")
    rng = random.Random(7)
    malformed = [
        ("notify", notify.to_wire()),
        ("short", valid[:7]),
        ("response bit", valid[:2] + bytes([valid[2] | 0x80]) + valid[3:]),
        ("status opcode", valid[:2] + bytes([(valid[2] & 0x87) | (2 << 3)]) + valid[3:]),
        ("two questions", valid[:4] + struct.pack("!H", 2) + valid[6:]),
        ("no question", valid[:4] + struct.pack("!H", 0) + valid[6:]),
        ("truncated question", valid[:20]),
        ("trailing junk", valid + b"\x01\x02"),
        *((f"garbage {i}", struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0) + rng.randbytes(24)) for i in range(8)),
    ]
    asked += [(label, "udp", wire) for label, wire in malformed]
    return asked


@dataclass
class TwoProxies:
    pod: PodNetwork
    resolver: Process

    def ask(self, port: int, asked: list[tuple[str, str, bytes]]) -> list[Any]:
        path = self.pod.workdir / f"queries-{port}.json"
        path.write_text(json.dumps([["127.0.0.1", port, protocol, wire.hex()] for _, protocol, wire in asked]))
        done = self.pod.run([sys.executable, "-m", "tests.dns.ask", str(path)], timeout=300)
        assert done.returncode == 0, done.stderr
        return [None if r is None else bytes.fromhex(r) for r in json.loads(done.stdout)]


@pytest.fixture(scope="module")
def proxies() -> Iterator[TwoProxies]:
    require_root()
    istio = istio_dns_binary()
    with pod_network("dnsd") as pod:
        search = " ".join(SEARCH)
        pod.set_resolv_conf(f"search {search}\nnameserver {pod.client_ip}\noptions ndots:5\n")
        resolver = pod.popen(
            [sys.executable, "-m", "tests.dns.resolver", pod.client_ip, "53", *UPSTREAM_RECORDS], ns="client"
        )
        wait_ready(resolver)
        table = pod.workdir / "table.json"
        table.write_text(table_json(TABLE))
        timeout_s = str(float(FORWARD_TIMEOUT.removesuffix("ms")) / 1000)
        started = [
            pod.popen([sys.executable, "-m", "tests.dns.run_proxy", str(table), f"127.0.0.1:{PYTHON_PORT}", timeout_s],
                      log_name="python-dns.log"),
            pod.popen([str(istio), f"127.0.0.1:{ISTIO_PORT}", NAMESPACE, DOMAIN, str(table), FORWARD_TIMEOUT, "false"],
                      log_name="istio-dns.log"),
        ]  # fmt: skip
        try:
            for process in started:
                wait_ready(process)
            yield TwoProxies(pod, resolver)
        finally:
            for process in started:
                process.stop()
            resolver.stop()


def test_same_answers_as_istio(proxies: TwoProxies) -> None:
    asked = queries()
    ours = proxies.ask(PYTHON_PORT, asked)
    theirs = proxies.ask(ISTIO_PORT, asked)
    differences = []
    for (label, protocol, _), mine, istio in zip(asked, ours, theirs, strict=True):
        if normalized(mine) != normalized(istio):
            differences.append(f"{protocol} {label}:\n  python {normalized(mine)}\n  istio  {normalized(istio)}")
    assert differences == [], "\n".join(differences)
    # The comparison compared something: table answers, forwarded answers, errors and silences.
    shapes = [normalized(r) for r in ours]
    assert sum(1 for s in shapes if isinstance(s, dict) and s["answer"]) > 40
    assert sum(1 for s in shapes if s is None) >= 2
