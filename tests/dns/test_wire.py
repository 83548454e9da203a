"""Reading queries and shaping replies: miekg/dns's accept rules, the reply header, cutting a reply to size."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dns.wire import (
    FORMERR,
    IGNORED,
    MALFORMED,
    NOERROR,
    NOT_IMPLEMENTED,
    SERVFAIL,
    Query,
    QueryReader,
    Rejected,
    fit,
    rejection,
    reply,
    reply_limit,
)


def query_bytes(name: str = "example.com.", rdtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()  # type: ignore[arg-type]


def with_header(data: bytes, **fields: int) -> bytes:
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    values = {"id": qid, "flags": flags, "qd": qd, "an": an, "ns": ns, "ar": ar, **fields}
    head = struct.pack("!HHHHHH", *(values[k] for k in ("id", "flags", "qd", "an", "ns", "ar")))
    return head + data[12:]


def test_a_query_is_read() -> None:
    query = QueryReader().read(query_bytes("Example.COM.", "AAAA", use_edns=0, payload=1232))
    assert isinstance(query, Query)
    assert (query.name, query.rdtype, query.udp_size) == ("example.com.", 28, 1232)
    assert reply_limit(query, tcp=False) == 1232
    assert reply_limit(query, tcp=True) == 65535


def test_small_or_missing_edns_size_counts_as_512() -> None:
    plain = QueryReader().read(query_bytes())
    tiny = QueryReader().read(query_bytes(use_edns=0, payload=100))
    assert isinstance(plain, Query) and isinstance(tiny, Query)
    assert reply_limit(plain, tcp=False) == reply_limit(tiny, tcp=False) == 512


def test_miekg_accept_rules() -> None:
    read = QueryReader().read
    good = query_bytes()
    assert read(good[:11]) is IGNORED
    assert read(with_header(good, flags=0x8000)) is IGNORED  # a response
    assert read(with_header(good, flags=2 << 11)) is NOT_IMPLEMENTED  # STATUS opcode
    assert read(with_header(good, flags=5 << 11)) is NOT_IMPLEMENTED  # UPDATE
    assert isinstance(read(with_header(good, flags=4 << 11)), Query)  # NOTIFY is served like a query
    assert read(with_header(good, qd=2)) is MALFORMED
    assert read(with_header(good, qd=0)) is MALFORMED
    assert read(with_header(good, an=2)) is MALFORMED
    assert read(with_header(good, ns=2)) is MALFORMED
    assert read(with_header(good, ar=3)) is MALFORMED
    assert isinstance(read(good + b"\x00\x01"), Query)  # bytes after the counted records are ignored
    assert read(with_header(good, ar=1)) is MALFORMED  # says one more record than it has


def test_reply_header_follows_miekg_set_reply() -> None:
    request = with_header(query_bytes(), id=0xBEEF, flags=0x0100 | 0x0010 | 0x0020 | 0x0080)  # RD, CD, AD, RA
    query = QueryReader().read(request)
    assert isinstance(query, Query)
    message = dns.message.from_wire(reply(request, query, SERVFAIL))
    assert message.id == 0xBEEF
    assert message.rcode() == SERVFAIL
    # QR set; RD and CD copied; AD, RA, AA not.
    assert message.flags == dns.flags.QR | dns.flags.RD | dns.flags.CD | SERVFAIL
    assert [q.to_text() for q in message.question] == ["example.com. IN A"]


def test_notify_reply_keeps_opcode_and_drops_rd() -> None:
    request = with_header(query_bytes(), flags=(4 << 11) | 0x0100)
    query = QueryReader().read(request)
    assert isinstance(query, Query)
    message = dns.message.from_wire(reply(request, query, NOERROR))
    assert message.opcode() == dns.opcode.NOTIFY
    assert not message.flags & dns.flags.RD


def test_rejections_echo_the_header() -> None:
    request = with_header(query_bytes(), id=7, flags=0x0100, qd=2)
    formerr = struct.unpack("!HHHHHH", rejection(request, FORMERR))
    assert formerr == (7, 0x8000 | 0x0100 | FORMERR, 0, 0, 0, 0)
    update = with_header(query_bytes(), id=8, flags=(5 << 11) | 0x0400)  # UPDATE with AA: AA cleared
    notimp = struct.unpack("!HHHHHH", rejection(update, NOT_IMPLEMENTED.rcode or 0))
    assert notimp == (8, 0x8000 | (5 << 11) | 4, 0, 0, 0, 0)


def test_remembered_queries_are_bounded() -> None:
    reader = QueryReader(capacity=8)
    for i in range(100):
        assert isinstance(reader.read(query_bytes(f"host{i}.example.com.")), Query)
    assert len(reader._seen) == 8
    # The newest are the ones kept; an old one is parsed again, correctly.
    again = reader.read(query_bytes("host0.example.com."))
    assert isinstance(again, Query) and again.name == "host0.example.com."


def big_response(count: int, edns: bool = False) -> bytes:
    query = dns.message.make_query("big.example.com.", "A", use_edns=0 if edns else None, payload=1232)
    response = dns.message.make_response(query)
    addresses = [f"10.0.{i // 256}.{i % 256}" for i in range(count)]
    response.answer.append(dns.rrset.from_text_list("big.example.com.", 30, "IN", "A", addresses))
    response.additional.append(dns.rrset.from_text("extra.example.com.", 30, "IN", "TXT", '"x"'))
    return response.to_wire(max_size=65535)


def test_fit_leaves_a_small_message_alone() -> None:
    message = big_response(3)
    assert fit(message, 512) is message


def test_fit_cuts_to_the_limit_and_sets_tc() -> None:
    message = fit(big_response(100), 512)
    assert len(message) <= 512
    parsed = dns.message.from_wire(message)
    assert parsed.flags & dns.flags.TC
    kept = sum(len(rrset) for rrset in parsed.answer)
    # Compressed: each further A record costs 16 bytes (2-byte pointer owner), so ~30 fit in 512.
    assert 25 <= kept < 100
    assert not parsed.additional


def test_fit_keeps_the_opt_record() -> None:
    original = dns.message.from_wire(big_response(200, edns=True))
    message = fit(big_response(200, edns=True), 1232)
    assert len(message) <= 1232
    parsed = dns.message.from_wire(message)
    assert parsed.edns == 0 and int(parsed.payload) == int(original.payload)
    assert parsed.flags & dns.flags.TC


def test_fit_with_room_for_everything_keeps_everything_and_no_tc() -> None:
    message = big_response(100)
    cut = fit(message, 4096)
    parsed = dns.message.from_wire(cut)
    assert sum(len(r) for r in parsed.answer) == 100
    assert not parsed.flags & dns.flags.TC


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_are_read_without_raising(data: bytes) -> None:
    result = QueryReader().read(data)
    assert isinstance(result, (Query, Rejected))
    if isinstance(result, Rejected) and result.rcode is not None:
        answer = rejection(data, result.rcode)
        assert len(answer) == 12 and answer[:2] == data[:2]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=80), st.integers(0, 0xFFFF))
def test_mutated_queries_are_read_without_raising(tail: bytes, flags: int) -> None:
    """Valid header counts with garbage behind them: the parser's error paths, not the header checks."""
    data = struct.pack("!HHHHHH", 1, flags & ~0x8000 & ~0x7800, 1, 0, 0, 0) + tail
    result = QueryReader().read(data)
    assert isinstance(result, (Query, Rejected))
    if isinstance(result, Query):
        assert result.name.endswith(".")
        dns.message.from_wire(reply(data, result, NOERROR))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 200), st.sampled_from([512, 1232, 4096]), st.booleans())
def test_fit_never_exceeds_the_limit(count: int, limit: int, edns: bool) -> None:
    message = fit(big_response(count, edns), limit)
    assert len(message) <= limit
    parsed = dns.message.from_wire(message)
    assert bool(parsed.flags & dns.flags.TC) == (len(big_response(count, edns)) > limit)
