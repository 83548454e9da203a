"""DNS messages on the query path: reading a query, building the reply, fitting a reply into the client's size.

dnspython parses every query the first time its bytes are seen; `QueryReader` remembers the result keyed by the
bytes after the message id and flags (a client repeats the same few questions with new ids), in a bounded table.
Replies are a 12-byte header, the client's question as dnspython rendered it, and records the lookup table
rendered in advance; a reply too large for the client is re-rendered by dnspython with name compression and as
many records as fit, the TC bit set (`fit`), which is what Istio's agent does with miekg/dns Msg.Truncate.

Which queries get which reply follows miekg/dns (the server library of Istio's agent):
- fewer than 12 bytes, or a response (QR set): no reply at all (a reply could be used for amplification);
- an opcode other than QUERY or NOTIFY: NOTIMP; not exactly one question, more than one answer or authority
  record, more than two additional records, or bytes dnspython cannot parse: FORMERR (id and flags echoed);
- otherwise the reply echoes the id, the opcode and (for QUERY) the RD and CD bits, and the first question.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.renderer
import dns.rrset

HEADER = struct.Struct("!HHHHHH")
HEADER_SIZE = 12
QR = 0x8000
OPCODE_MASK = 0x7800
AA = 0x0400
TC = 0x0200
RD = 0x0100
Z = 0x0040
CD = 0x0010
RCODE_MASK = 0x000F
OPCODE_QUERY = 0
OPCODE_NOTIFY = 4
NOERROR = int(dns.rcode.NOERROR)
FORMERR = int(dns.rcode.FORMERR)
SERVFAIL = int(dns.rcode.SERVFAIL)
NOTIMP = int(dns.rcode.NOTIMP)
# RFC 1035 / RFC 6891: a UDP client without EDNS takes 512 bytes; an advertised size below 512 counts as 512.
MIN_UDP_SIZE = 512
MAX_MESSAGE_SIZE = 65535
# Query bytes longer than this are parsed every time rather than remembered (keys stay small).
_CACHEABLE_QUERY_SIZE = 512


@dataclass(frozen=True, slots=True)
class Query:
    """What the server needs from a parsed query."""

    name: str  # lower-case, absolute presentation form ("productpage.ns1.svc.cluster.local.")
    rdtype: int
    question: bytes  # the first question, rendered (name as the client wrote it, type, class)
    udp_size: int  # the client's EDNS payload size, 0 without EDNS


class Rejected:
    """A query answered with an error rcode (FORMERR, NOTIMP) or not at all (rcode None)."""

    __slots__ = ("rcode",)

    def __init__(self, rcode: int | None) -> None:
        self.rcode = rcode


IGNORED = Rejected(None)
MALFORMED = Rejected(FORMERR)
NOT_IMPLEMENTED = Rejected(NOTIMP)


class QueryReader:
    """Parses queries with dnspython and remembers up to `capacity` of them (oldest forgotten first)."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._seen: dict[bytes, Query | Rejected] = {}

    def read(self, data: bytes) -> Query | Rejected:
        if len(data) < HEADER_SIZE:
            return IGNORED
        _, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
        if flags & QR:
            return IGNORED
        if (flags & OPCODE_MASK) >> 11 not in (OPCODE_QUERY, OPCODE_NOTIFY):
            return NOT_IMPLEMENTED
        if qdcount != 1 or ancount > 1 or nscount > 1 or arcount > 2:
            return MALFORMED
        # The id (bytes 0-1) and flags (2-3) do not change what the rest parses to.
        key = data[4:]
        known = self._seen.get(key)
        if known is not None:
            return known
        parsed = _parse(data)
        if len(data) <= _CACHEABLE_QUERY_SIZE:
            if len(self._seen) >= self.capacity:
                del self._seen[next(iter(self._seen))]
            self._seen[key] = parsed
        return parsed


def name_wire(name: dns.name.Name) -> bytes:
    """A name in uncompressed wire format."""
    wire = name.to_wire()
    assert wire is not None  # None only when writing to a file
    return wire


def rdata_wire(rdata: dns.rdata.Rdata) -> bytes:
    wire = rdata.to_wire()
    assert wire is not None  # None only when writing to a file
    return wire


def _parse(data: bytes) -> Query | Rejected:
    try:
        # Bytes after the counted records are ignored, as miekg/dns does.
        message = dns.message.from_wire(data, ignore_trailing=True)
        question = message.question[0]
        rendered = name_wire(question.name) + struct.pack("!HH", question.rdtype, question.rdclass)
        name = question.name.to_text().lower()
    # dnspython raises DNSException subclasses for bad messages, and a few ValueErrors (e.g. bad EDNS options);
    # whatever it is, the bytes are not a query we can answer.
    except Exception:
        return MALFORMED
    return Query(name, int(question.rdtype), rendered, message.payload if message.edns >= 0 else 0)


def reply_limit(query: Query, tcp: bool) -> int:
    """The largest reply the client takes (Istio's size()): 65535 over TCP, else the EDNS size but at least 512."""
    if tcp:
        return MAX_MESSAGE_SIZE
    return max(query.udp_size, MIN_UDP_SIZE)


def reply_flags(request_flags: int, rcode: int, authoritative: bool = False) -> int:
    """miekg/dns SetReply: QR, the request's opcode, RD and CD copied for QUERY; RA is never set."""
    flags = QR | (request_flags & OPCODE_MASK) | rcode
    if request_flags & OPCODE_MASK == OPCODE_QUERY << 11:
        flags |= request_flags & (RD | CD)
    if authoritative:
        flags |= AA
    return flags


def reply(
    request: bytes, query: Query, rcode: int, answers: Sequence[bytes] = (), authoritative: bool = False
) -> bytes:
    """A reply with the request's id and question, and `answers` (records already in wire format)."""
    (request_flags,) = struct.unpack_from("!H", request, 2)
    header = HEADER.pack(
        (request[0] << 8) | request[1], reply_flags(request_flags, rcode, authoritative), 1, len(answers), 0, 0
    )
    return b"".join((header, query.question, *answers))


def rejection(request: bytes, rcode: int) -> bytes:
    """FORMERR or NOTIMP for a request that was not parsed (miekg/dns: the request's header bits are echoed with QR
    set and AA, Z cleared; opcode QUERY for FORMERR; no records)."""
    (request_flags,) = struct.unpack_from("!H", request, 2)
    flags = (request_flags & ~(AA | Z | RCODE_MASK)) | QR | rcode
    if rcode == FORMERR:
        flags &= ~OPCODE_MASK
    return HEADER.pack((request[0] << 8) | request[1], flags, 0, 0, 0, 0)


def fit(message: bytes, limit: int) -> bytes:
    """`message`, or when it is longer than `limit`, the same message compressed and cut to the records that fit,
    TC set (miekg/dns Msg.Truncate: the EDNS OPT record is kept; a TSIG-signed message is left as is). Raises
    dns.exception.DNSException (or ValueError) when the message cannot be parsed."""
    if len(message) <= limit:
        return message
    parsed = dns.message.from_wire(message)
    if parsed.tsig is not None:
        return message
    limit = max(limit, MIN_UDP_SIZE)
    renderer = dns.renderer.Renderer(parsed.id, parsed.flags, limit)
    for question in parsed.question:
        renderer.add_question(question.name, question.rdtype, question.rdclass)
    opt_size = 0
    if parsed.opt is not None:
        rendered_opt = io.BytesIO()
        parsed.opt.to_wire(rendered_opt)
        opt_size = len(rendered_opt.getvalue())
    renderer.reserve(opt_size)
    truncated = False
    sections = (
        (dns.renderer.ANSWER, parsed.answer),
        (dns.renderer.AUTHORITY, parsed.authority),
        (dns.renderer.ADDITIONAL, parsed.additional),
    )
    for section, rrsets in sections:
        for rrset in rrsets:
            for rdata in rrset:
                single = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype, rrset.covers)
                single.update_ttl(rrset.ttl)
                single.add(rdata)
                try:
                    renderer.add_rrset(section, single)
                except dns.exception.TooBig:
                    truncated = True
                    break
            if truncated:
                break
        if truncated:
            break
    renderer.release_reserved()
    if parsed.opt is not None:
        renderer.add_opt(parsed.opt)
    if truncated:
        renderer.flags |= TC
    renderer.write_header()
    return bytes(renderer.get_wire())
