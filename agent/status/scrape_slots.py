"""How many merged scrapes run at once, and which one gives way to a new one.

Each merge holds upstream connections, a filter's state and a compressor until its scraper has read the answer. At
300 merges at once the agent grew from 47 MB to ~480 MB (issue 12), and 70 scrapers that never read pinned every
upstream connection, so the scrapes of the real Prometheus lost Envoy's and the application's metrics. So:

* at most `limit` merges run at once; the excess is answered at once with promhttp's own answer to the same
  situation (client_golang's `HandlerOpts.MaxRequestsInFlight`): `503 Limit of concurrent requests reached (N), try
  again later.` Prometheus counts it as a failed scrape of that interval;
* a merge whose scraper has not taken its output for STALL seconds (blocked writing) gives way: when every slot is
  taken, a new scrape closes the connection of the merge stalled longest and runs in its place. A scraper that
  reads never stalls that long (its kernel buffer empties in milliseconds), so a slow reader cannot lock out the
  real Prometheus.
"""

from __future__ import annotations

import asyncio

# Two Prometheus replicas, a collector and a person with curl fit; each merge is bounded (see metrics_merge).
MAX_MERGES = 8
STALL = 0.5


class MergeSlot:
    """One running merge: its scraper's transport, and since when it waits for the scraper to read (or None)."""

    __slots__ = ("blocked_since", "transport")

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self.transport = transport
        self.blocked_since: float | None = None


class MergeSlots:
    def __init__(self, limit: int = MAX_MERGES) -> None:
        self.limit = limit
        self._active: set[MergeSlot] = set()

    @property
    def active(self) -> int:
        return len(self._active)

    def take(self, transport: asyncio.Transport | None) -> MergeSlot | None:
        """A slot for a new merge, or None when all are taken by merges that are not stalled."""
        if len(self._active) >= self.limit:
            now = asyncio.get_running_loop().time()
            stalled = [s for s in self._active if s.blocked_since is not None and now - s.blocked_since >= STALL]
            if not stalled:
                return None
            victim = min(stalled, key=lambda s: s.blocked_since or now)
            self._active.discard(victim)
            if victim.transport is not None:
                # Its write fails at once and the merge ends, closing its upstream responses.
                victim.transport.abort()
        slot = MergeSlot(transport)
        self._active.add(slot)
        return slot

    def release(self, slot: MergeSlot) -> None:
        self._active.discard(slot)
