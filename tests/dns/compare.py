"""Comparing DNS replies across proxies: queries with stable ids, replies reduced to what must be equal."""

from __future__ import annotations

import random
from typing import Any

import dns.message
import dns.rdataclass
import dns.rdatatype


def query_wire(name: str, rdtype: str = "A", **kwargs: Any) -> bytes:
    """A query whose id depends only on what it asks (both proxies get the same bytes)."""
    message = dns.message.make_query(name, rdtype, **kwargs)
    message.id = random.Random(name + rdtype + repr(sorted(kwargs.items()))).randrange(65536)
    return message.to_wire()


def normalized(wire: bytes | None) -> Any:
    """The reply as a comparable value: None for no reply; id, flags, rcode, every section with owner names lower
    case and records sorted (but a CNAME before the addresses it names); the EDNS version."""
    if wire is None:
        return None
    try:
        message = dns.message.from_wire(wire)
    except Exception as exc:
        return f"unparsable: {type(exc).__name__}"

    def rows(section: list[Any]) -> list[str]:
        out = []
        for rrset in section:
            for rdata in rrset:
                out.append(f"{rrset.name.to_text().lower()} {rrset.ttl} {dns.rdataclass.to_text(rrset.rdclass)} "
                           f"{dns.rdatatype.to_text(rrset.rdtype)} {rdata.to_text().lower()}")  # fmt: skip
        # Order matters only for a CNAME before the addresses it names.
        return sorted(out, key=lambda row: (" CNAME " not in row, row))

    return {
        "id": message.id,
        "flags": int(message.flags),
        "rcode": int(message.rcode()),
        "question": [q.to_text().lower() for q in message.question],
        "answer": rows(message.answer),
        "authority": rows(message.authority),
        "additional": rows(message.additional),
        "edns": message.edns,
    }
