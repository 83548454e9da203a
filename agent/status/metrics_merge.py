"""`/stats/prometheus` and `/metrics`: the agent's registry, then Envoy's, then the application's, as one exposition.

Istio's contract kept: sources are fetched concurrently; a failed or slow source is counted in
`istio_agent_scrape_failures_total{type}` and left out while the rest is served with 200; the per-source deadline
comes from `X-Prometheus-Scrape-Timeout-Seconds`; Accept is negotiated (text 0.0.4 or OpenMetrics with one `# EOF`
last); gzip when asked; a size cap per source.

Beyond Istio: bodies are STREAMED (a chunk in, its complete lines filtered, written out), so memory stays bounded
whatever a source sends, and `exposition.FamilyFilter` keeps the output valid when sources repeat a family.
Streaming has one consequence: a source that fails half way (cap reached, deadline passed, connection lost) cannot
be taken back; its output ends at its last complete line, and the failure is counted like any other.

Under concurrency (scrape_slots): at most MAX_MERGES merges at once, the excess answered 503; a merge stalled on a
scraper that does not read gives way to a new one; writing ends shortly after the sources' deadline; Envoy and the
applications have separate connection pools.

Speed (issue 15; the output is unchanged, tests/status/test_merge_equivalence.py): Envoy is read from its admin
port (the 15090 listener only proxies to it); the requests go out before the agent renders its own section; blocks
in Envoy's shape pass through untouched after one regex match, their claims cached per family; an application's
blocks whose every line is valid are filtered family by family; gzip at level 1 on the loop, sent in large writes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from dataclasses import dataclass

import aiohttp
import yarl
from aiohttp import web

from agent.metrics import AgentMetrics
from agent.status.agent_section import AgentSection
from agent.status.exposition import (
    TEXT_ACCEPT,
    FamilyFilter,
    SourceGarbage,
    negotiate,
    output_content_type,
    response_is_openmetrics,
)
from agent.status.scrape_slots import MergeSlot, MergeSlots
from agent.status.settings import StatusSettings

log = logging.getLogger("agent.status")

TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
# A single line longer than this is not metrics; stop reading the source instead of buffering it.
MAX_LINE = 1024 * 1024
READ_SIZE = 64 * 1024
# How long past the sources' deadline the scraper may take to read the rest of the answer.
WRITE_MARGIN = 1.0
GZIP_LEVEL = 1
# Compressed output is sent in writes of this size (or at the end).
WRITE_SIZE = 64 * 1024
# A merge whose sources' bytes are all buffered lets other requests in at least this often (seconds).
YIELD_EVERY = 0.002


@dataclass
class Upstream:
    kind: str  # "envoy" or "application": the `type` label of scrape failures
    url: str | yarl.URL
    response: aiohttp.ClientResponse | None = None


class _ClientGone(Exception):
    """Writing to the scraper failed: it hung up, or stalled past the deadline. Not a source failure."""


class _Output:
    """The scraper's side of one merge: every write marks the slot blocked until the scraper takes it, and ends
    at the merge's deadline (a scraper that stops reading would otherwise hold the merge, and its upstream
    connections, forever). Compresses on the loop when the scraper asked for gzip."""

    __slots__ = ("deadline", "gzip", "pending", "pending_size", "response", "slot")

    def __init__(self, response: web.StreamResponse, slot: MergeSlot, deadline: float, *, compress: bool) -> None:
        self.response = response
        self.slot = slot
        self.deadline = deadline
        # Level 1 on the loop: aiohttp's compression (level 6, each chunk over 4 KiB handed to a worker thread)
        # cost ~3 ms of CPU per scrape of a sidecar's metrics; level 1 compresses 260 KB in ~0.5 ms, still ~13x.
        self.gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if compress else None
        self.pending: list[bytes] = []
        self.pending_size = 0

    async def write(self, data: bytes) -> None:
        if self.gzip is None:
            await self._send(data)
            return
        # Compressed output is held until it fills a write: an exposition compresses ~15x, and every send to
        # the scraper costs the kernel's loopback work in our time.
        self.pending.append(self.gzip.compress(data))
        self.pending_size += len(self.pending[-1])
        if self.pending_size >= WRITE_SIZE:
            await self._flush()

    async def finish(self) -> None:
        if self.gzip is not None:
            self.pending.append(self.gzip.flush())
            await self._flush()

    async def _flush(self) -> None:
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_size = 0
        if data:
            await self._send(data)

    async def _send(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.slot.blocked_since = loop.time()
        try:
            async with asyncio.timeout_at(self.deadline):
                await self.response.write(data)
        except TimeoutError:
            # Cut the connection: finishing the response would hand the scraper a shorter exposition as if whole.
            if self.slot.transport is not None:
                self.slot.transport.abort()
            raise _ClientGone("the scraper did not read the answer before the deadline") from None
        except (ConnectionError, RuntimeError) as exc:  # aiohttp: reset, or "Cannot write to closing transport"
            raise _ClientGone(str(exc)) from exc
        finally:
            self.slot.blocked_since = None


class MetricsMerger:
    """Serves the merged scrape. Owns its client sessions (start() and close()) and its merge slots."""

    def __init__(self, settings: StatusSettings, metrics: AgentMetrics, slots: MergeSlots | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.slots = slots or MergeSlots()
        self._agent = AgentSection(metrics.registry)
        self._envoy: aiohttp.ClientSession | None = None
        self._apps: aiohttp.ClientSession | None = None
        # Envoy's families' claims, computed once per family (exposition.FamilyFilter.pass_block).
        self._envoy_claims: dict[tuple[bytes, bytes], frozenset[bytes]] = {}

    def start(self) -> None:
        """Open the client sessions: one for Envoy, one for the applications, so that a slow application cannot
        take the connections Envoy's metrics need. Kept alive: a scrape every few seconds reuses them. Each pool
        has room for every merge twice over (a merge that gave way still closes its connections)."""
        room = 2 * self.slots.limit
        self._envoy = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=room, ttl_dns_cache=None), timeout=aiohttp.ClientTimeout(total=None)
        )
        targets = max(1, len(self.settings.scrape_targets))
        self._apps = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=room * targets, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        for session in (self._envoy, self._apps):
            if session is not None:
                await session.close()
        self._envoy = self._apps = None

    def _timeout(self, request: web.Request) -> float:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw:
            try:
                value = float(raw)
            except ValueError:
                value = 0.0
            if value > 0 and math.isfinite(value):
                # Leave a margin to write the answer before Prometheus itself gives up on us.
                return max(value - 0.25, value * 0.5)
        return self.settings.default_scrape_timeout

    async def handle(self, request: web.Request) -> web.StreamResponse:
        slot = self.slots.take(request.transport)
        if slot is None:
            self.metrics.scrapes_rejected.inc()
            limit = self.slots.limit
            return web.Response(status=503, text=f"Limit of concurrent requests reached ({limit}), try again later.\n")
        try:
            return await self._merge(request, slot)
        finally:
            self.slots.release(slot)

    async def _merge(self, request: web.Request, slot: MergeSlot) -> web.StreamResponse:
        self.metrics.scrapes.inc()
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self._timeout(request)
        negotiated = negotiate(request.headers.get("Accept"))
        # identity: compressing on loopback only burns the sources' CPU and ours (a 10k-line prometheus_client
        # body costs more to gzip than to generate); the scraper's own Accept-Encoding applies to our answer only.
        forward = {"User-Agent": request.headers.get("User-Agent", "pilot-agent"), "Accept-Encoding": "identity"}
        if TIMEOUT_HEADER in request.headers:
            forward[TIMEOUT_HEADER] = request.headers[TIMEOUT_HEADER]
        upstreams: list[Upstream] = []
        if self.settings.merge_envoy_stats:
            # The query string goes to Envoy as the scraper sent it (Istio forwards RawQuery): decoding it here
            # would turn %23 into a fragment and %2B into a '+' Envoy may read as a space.
            raw_query = request.rel_url.raw_query_string
            # Envoy's admin port, not its prometheus listener (Istio reads 15090): the listener only proxies to
            # the same admin handler, and that hop cost 0.7 ms of a 4.4 ms scrape (issue 15).
            port = self.settings.admin_port
            url = f"http://127.0.0.1:{port}/stats/prometheus" + (f"?{raw_query}" if raw_query else "")
            upstreams.append(Upstream("envoy", yarl.URL(url, encoded=True)))
        host = self.settings.scrape_host
        host = f"[{host}]" if ":" in host else host
        for target in self.settings.scrape_targets:
            upstreams.append(Upstream("application", f"http://{host}:{target.port}{target.path}"))
        # Every source is asked at once; the requests go out at the sleep(0) below, so that the sources work while
        # the agent renders its own section.
        opening = asyncio.gather(
            *(
                self._open(
                    u, {**forward, "Accept": negotiated.app_accept if u.kind != "envoy" else TEXT_ACCEPT}, deadline
                )
                for u in upstreams
            )
        )
        try:
            # The format is known for sure only once the applications answer; the guess is right unless they
            # disagree with the scraper's Accept, and then the agent's section is encoded again.
            guess = negotiated.wants_openmetrics and bool(self.settings.scrape_targets)
            await asyncio.sleep(0)
            agent_section = self._agent_section(guess)
            await opening
            app_types = [
                u.response.headers.get("Content-Type", "") if u.response is not None else None
                for u in upstreams
                if u.kind == "application"
            ]
            content_type = output_content_type(app_types)
            openmetrics = response_is_openmetrics(content_type)
            response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
            compress = "gzip" in request.headers.get("Accept-Encoding", "").lower()
            if compress:
                response.headers["Content-Encoding"] = "gzip"
            try:
                await response.prepare(request)
            except (ConnectionError, RuntimeError) as exc:  # the scraper gave up while the sources were awaited
                raise _ClientGone(str(exc)) from exc
            # Writing may take a little past the sources' deadline (their margin), not more.
            output = _Output(response, slot, deadline + WRITE_MARGIN, compress=compress)
            if openmetrics != guess:
                agent_section = self._agent_section(openmetrics)
            claimed: set[bytes] = set()
            if agent_section is not None:
                body, agent_claims = agent_section
                claimed |= agent_claims
                await output.write(body)
            for index, upstream in enumerate(upstreams):
                if upstream.response is not None:
                    last = index == len(upstreams) - 1
                    await self._stream(upstream, output, claimed, openmetrics=openmetrics, deadline=deadline, last=last)
            if openmetrics:
                await output.write(b"# EOF\n")
            await output.finish()
            log.debug(
                "merged scrape: agent, %s in %.1f ms (%s)",
                ", ".join(u.kind if u.response is not None else f"{u.kind} left out" for u in upstreams) or "alone",
                (loop.time() - began) * 1000,
                content_type,
            )
            # No write_eof() here: aiohttp finishes the response itself.
            return response
        except _ClientGone:
            log.debug("scraper hung up during a merged scrape")
            return response
        finally:
            if not opening.done():
                opening.cancel()
            for upstream in upstreams:
                if upstream.response is not None:
                    upstream.response.close()

    def _fail(self, kind: str, what: str) -> None:
        self.metrics.scrape_failures.labels(kind).inc()
        log.warning("failed scraping %s metrics: %s", kind, what)

    async def _open(self, upstream: Upstream, headers: dict[str, str], deadline: float) -> None:
        session = self._envoy if upstream.kind == "envoy" else self._apps
        assert session is not None, "MetricsMerger.start() not called"
        try:
            async with asyncio.timeout_at(deadline):
                response = await session.get(upstream.url, headers=headers)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._fail(upstream.kind, f"{upstream.url}: {type(exc).__name__}: {exc}")
            return
        if response.status != 200:
            response.close()
            self._fail(upstream.kind, f"{upstream.url}: HTTP {response.status}")
            return
        upstream.response = response

    def _agent_section(self, openmetrics: bool) -> tuple[bytes, set[bytes]] | None:
        """The agent's registry, encoded as Istio's agent writes it, and the names it claims; None (counted) if a
        collector fails."""
        try:
            return self._agent.encode(openmetrics)
        except Exception as exc:  # a broken custom collector must not cost Envoy's and the app's metrics
            self._fail("agent", f"{type(exc).__name__}: {exc}")
            return None

    async def _stream(
        self,
        upstream: Upstream,
        output: _Output,
        claimed: set[bytes],
        *,
        openmetrics: bool,
        deadline: float,
        last: bool,
    ) -> None:
        assert upstream.response is not None
        source = upstream.response
        # Envoy's body is trusted (our own proxy); the application's is checked line by line (or block by block
        # when every line is valid: FamilyFilter.feed_checked_block).
        filt = FamilyFilter(frozenset(claimed), openmetrics, validate=upstream.kind != "envoy", record=not last)
        if upstream.kind == "envoy":
            filt.claims_cache = self._envoy_claims
        cap = self.settings.source_cap_bytes
        total = 0
        carry = b""
        out: list[bytes] = []
        failure: str | None = None
        try:
            loop = asyncio.get_running_loop()
            yielded = loop.time()
            while True:
                # Let other requests (kubelet's probes) in every YIELD_EVERY seconds: when the source's bytes are
                # already buffered, read() and write() return without yielding and a merge would run start to end.
                if loop.time() - yielded > YIELD_EVERY:
                    await asyncio.sleep(0)
                    yielded = loop.time()
                async with asyncio.timeout_at(deadline):
                    # At most 64 KiB at a time: the split lines of a chunk cost ~2x its size in objects.
                    chunk = await source.content.read(READ_SIZE)
                if not chunk:
                    break
                if total + len(chunk) > cap:
                    # Keep the complete lines that fit under the cap, then stop reading.
                    chunk = chunk[: cap - total]
                    failure = f"{upstream.url}: body exceeds the {cap}-byte cap; truncated"
                total += len(chunk)
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                if failure is None and cut and filt.take_block(data[:cut], out):
                    carry = data[cut:]
                    await output.write(b"".join(out))
                    out.clear()
                    continue
                if failure is None and cut and len(data) - cut <= MAX_LINE and filt.feed_checked_block(data[:cut], out):
                    carry = data[cut:]
                    if out:
                        out.append(b"")
                        await output.write(b"\n".join(out))
                        out.clear()
                    continue
                lines = data.split(b"\n")
                carry = lines.pop()
                if failure is not None:
                    filt.feed(lines, out)
                    break
                if len(carry) > MAX_LINE:
                    failure = f"{upstream.url}: a line longer than {MAX_LINE} bytes; truncated"
                    break
                filt.feed(lines, out)
                if out:
                    out.append(b"")
                    await output.write(b"\n".join(out))
                    out.clear()
            if failure is None and carry:
                filt.feed([carry], out)
        except SourceGarbage as exc:
            failure = f"{upstream.url}: {exc}"
        except TimeoutError:
            failure = f"{upstream.url}: deadline passed after {total} bytes; truncated"
        except (aiohttp.ClientError, OSError) as exc:
            failure = f"{upstream.url}: {type(exc).__name__}: {exc}; truncated"
        filt.finish(out)
        if out:
            out.append(b"")
            await output.write(b"\n".join(out))
        if failure is not None:
            self._fail(upstream.kind, failure)
        if filt.dropped_families or filt.invalid_lines:
            self.metrics.scrape_dropped.labels(upstream.kind, "duplicate_family").inc(filt.dropped_families)
            self.metrics.scrape_dropped.labels(upstream.kind, "invalid_line").inc(filt.invalid_lines)
            log.debug(
                "%s: left out %d families already exposed by an earlier source and %d invalid lines",
                upstream.url,
                filt.dropped_families,
                filt.invalid_lines,
            )
        claimed |= filt.new_claims
