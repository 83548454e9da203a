"""A small client for Envoy's admin API (127.0.0.1:<proxyAdminPort>), shared by readiness, drain and supervision.

Every call has a timeout and raises AdminError (never aiohttp's own types) so callers classify failures by type.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp


class AdminError(Exception):
    """The admin API could not be reached, timed out, or answered a non-2xx status."""


class AdminTimeout(AdminError):
    """The admin API did not answer within the timeout (Envoy stopped, or its main thread stuck)."""


class AdminUnreachable(AdminError):
    """Nothing accepted the connection (nothing listens on the port, or the host is unreachable)."""


# server.state values (envoy/admin/v3/server_info.proto): LIVE=0, DRAINING=1, PRE_INITIALIZING=2, INITIALIZING=3.
SERVER_STATES = {0: "LIVE", 1: "DRAINING", 2: "PRE_INITIALIZING", 3: "INITIALIZING"}


@dataclass(frozen=True)
class AdminClient:
    host: str = "127.0.0.1"
    port: int = 15000

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 2.0
    ) -> tuple[int, bytes]:
        url = f"{self.base_url}/{path.lstrip('/')}"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
                session.request(method, url, data=body) as response,
            ):
                return response.status, await response.read()
        except TimeoutError as exc:  # aiohttp's own timeouts (ServerTimeoutError, ...) are TimeoutErrors too
            raise AdminTimeout(f"{method} {url}: no answer within {timeout:g}s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise AdminUnreachable(f"{method} {url}: {cannot_connect(exc)}") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # ValueError: a malformed method
            raise AdminError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    async def _ok(self, method: str, path: str, timeout: float = 2.0) -> bytes:
        status, body = await self.request(method, path, timeout=timeout)
        if not 200 <= status < 300:
            raise AdminError(f"{method} {path}: HTTP {status}: {body[:200]!r}")
        return body

    async def stats(self, filter_regex: str, timeout: float = 2.0) -> dict[str, int]:
        """`GET /stats?usedonly&filter=...` parsed into {name: value} (counters and gauges only)."""
        body = await self._ok("GET", f"/stats?usedonly&filter={quote(filter_regex)}", timeout=timeout)
        return parse_stats(body.decode("utf-8", "replace"))

    async def server_state(self, timeout: float = 1.0) -> str:
        """LIVE, DRAINING, PRE_INITIALIZING or INITIALIZING, from `server.state`."""
        stats = await self.stats(r"^server\.state$", timeout=timeout)
        if "server.state" not in stats:
            raise AdminError("server.state is not yet updated")
        return SERVER_STATES.get(stats["server.state"], "UNKNOWN")

    async def server_info(self, timeout: float = 1.0) -> dict[str, object]:
        """`GET /server_info` as JSON (state, command_line_options.restart_epoch, ...)."""
        body = await self._ok("GET", "/server_info", timeout=timeout)
        try:
            info = json.loads(body)
        except ValueError as exc:
            raise AdminError(f"/server_info: not JSON: {exc}") from exc
        if not isinstance(info, dict):
            raise AdminError("/server_info: not a JSON object")
        return info

    async def live_epoch(self, timeout: float = 1.0) -> int | None:
        """The restart epoch of the Envoy answering on the admin port when it is LIVE, else None. Raises
        AdminTimeout when nothing answers in time (a stopped or stuck Envoy is not "not LIVE yet").

        During a hot restart the parent answers until the child takes the admin socket over, so "LIVE" alone does
        not say which epoch is live; `server.hot_restart_epoch` does. (Two gauges: far lighter than /server_info
        for the supervisor's polling.)"""
        try:
            stats = await self.stats(r"^server\.(state|hot_restart_epoch)$", timeout=timeout)
        except AdminTimeout:
            raise
        except AdminError:
            return None
        if stats.get("server.state") != 0:  # 0 is LIVE
            return None
        return stats.get("server.hot_restart_epoch", 0)

    async def is_live(self, timeout: float = 1.0) -> bool:
        try:
            return await self.server_state(timeout) == "LIVE"
        except AdminError:
            return False

    async def drain_listeners(self, *, inbound_only: bool, graceful: bool = True, skip_exit: bool = False) -> None:
        flags = [
            name for name, on in (("inboundonly", inbound_only), ("graceful", graceful), ("skip_exit", skip_exit)) if on
        ]
        path = "/drain_listeners" + ("?" + "&".join(flags) if flags else "")
        await self._ok("POST", path)


def cannot_connect(exc: aiohttp.ClientConnectorError) -> str:
    """ "cannot connect to host:port (connection refused)": the kernel's words, not the library's."""
    errno = exc.os_error.errno
    why = os.strerror(errno).lower() if errno else "connection failed"
    return f"cannot connect to {exc.host}:{exc.port} ({why})"


def parse_stats(text: str) -> dict[str, int]:
    """Parse admin `/stats` text (`name: value` lines). Histogram lines (non-integer values) are skipped."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if value.isdigit():
            values[name.strip()] = int(value)
    return values


def active_connections(stats: dict[str, int], excluded_ports: tuple[int, ...]) -> int:
    """Sum of listener downstream_cx_active, Istio's way (pkg/envoy/agent.go activeProxyConnections): Istio's own
    listeners (`excluded_ports`), admin, envoy_internal and per-worker stats left out."""
    total = 0
    for name, value in stats.items():
        if not name.startswith("listener.") or "worker_" in name or name.startswith("listener.admin."):
            continue
        if "envoy_internal" in name or any(f"_{port}." in name for port in excluded_ports):
            continue
        total += value
    return total
