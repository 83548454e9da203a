"""What the DNS proxy answers (Istio's LocalDNSServer.ServeDNS), without the sockets.

`DnsProxy.local_answer` answers from the name table when it can, synchronously (the hot path allocates no task);
otherwise it hands back the parsed query and `upstream_answer` forwards it. Before the first table every query
gets SERVFAIL (or, with respond_before_sync, is forwarded). A new table replaces the old one in one assignment, so
a query sees either the old table or the new one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from agent.aio import off_loop
from agent.dns.metrics import DnsMetrics
from agent.dns.nds_pb2 import NameTable
from agent.dns.table import LookupTable, TableSettings
from agent.dns.upstream import Upstream
from agent.dns.wire import NOERROR, SERVFAIL, Query, QueryReader, Rejected, fit, rejection, reply, reply_limit

log = logging.getLogger("agent.dns")


class DnsProxy:
    def __init__(
        self,
        table_settings: TableSettings,
        upstream: Upstream,
        metrics: DnsMetrics,
        *,
        respond_before_sync: bool = False,
        reader: QueryReader | None = None,
    ) -> None:
        self.table_settings = table_settings
        self.upstream = upstream
        self.metrics = metrics
        self.respond_before_sync = respond_before_sync
        self.reader = reader or QueryReader()
        self._lookup: LookupTable | None = None
        self._name_table: NameTable | None = None
        self.tables_received = 0
        self.table_arrived = asyncio.Event()

    @property
    def ready(self) -> bool:
        """True once the first name table has arrived (Istio's IsReady; readiness waits for it)."""
        return self._lookup is not None

    @property
    def name_table(self) -> NameTable | None:
        """The last table received, as istiod sent it."""
        return self._name_table

    def set_table(self, table: NameTable, lookup: LookupTable | None = None) -> None:
        """Serve `table` from now on. `lookup` is the table already built (by `build`, perhaps in a thread)."""
        lookup = lookup if lookup is not None else self.build(table)
        self._lookup, self._name_table = lookup, table
        self.tables_received += 1
        self.table_arrived.set()
        log.debug("updated lookup table with %d names", len(lookup))

    def build(self, table: NameTable) -> LookupTable:
        return LookupTable.build(table, self.table_settings)

    async def update(self, table: NameTable) -> None:
        """Build the lookup table off the event loop (a large mesh's table takes a while) and serve it."""
        self.set_table(table, await off_loop(functools.partial(self.build, table), name="dns-table"))

    def local_answer(self, data: bytes, tcp: bool) -> bytes | Query | None:
        """The reply to send now; None to send nothing; the parsed Query when the upstream must answer it."""
        query = self.reader.read(data)
        if isinstance(query, Rejected):
            return None if query.rcode is None else rejection(data, query.rcode)
        self.metrics.requests.inc()
        lookup = self._lookup
        if lookup is None:
            if self.respond_before_sync:
                return query
            log.debug("dns request for host %r before lookup table is loaded", query.name)
            return reply(data, query, SERVFAIL)
        answers = lookup.lookup(query.name, query.rdtype)
        if answers is None:
            return query
        # We are the authority for the names istiod gave us.
        return fit(reply(data, query, NOERROR, answers, authoritative=True), reply_limit(query, tcp))

    async def upstream_answer(self, data: bytes, query: Query, tcp: bool) -> bytes:
        """The upstream's reply to `data`, cut to what the client takes; SERVFAIL when no server answered."""
        self.metrics.upstream_requests.inc()
        started = time.monotonic()
        try:
            response = await self.upstream.forward(data, tcp)
        finally:
            self.metrics.upstream_duration.observe(time.monotonic() - started)
        if response is not None:
            try:
                return fit(response, reply_limit(query, tcp))
            except Exception as exc:
                log.info("upstream answer for %r could not be parsed: %s", query.name, exc)
        self.metrics.upstream_failures.inc()
        return reply(data, query, SERVFAIL)

    async def answer(self, data: bytes, tcp: bool) -> bytes | None:
        result = self.local_answer(data, tcp)
        if isinstance(result, Query):
            return await self.upstream_answer(data, result, tcp)
        return result
