"""One log line at start that says what runs: the agent's, Istio's and Envoy's versions and the settings that matter.

Envoy's version is the running Envoy's own (admin `/server_info`): asking the binary (`envoy --version`, 0.1 - 0.4 s)
or the package metadata (~30 ms) before Envoy's exec would delay Envoy's start, so the line is written by a
one-shot service once Envoy answers, at about the time it goes LIVE (or without the version, if it never does).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from agent import __version__
from agent.versions import ISTIO_COMPAT_VERSION, istio_followed

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.config import AgentConfig
    from agent.proxy.admin import AdminClient
    from agent.proxy.argv import LaunchSettings

log = logging.getLogger("agent.cli")


def settings_summary(cfg: AgentConfig, launch: LaunchSettings, termination_drain: float) -> str:
    """The effective settings a reader of the log needs first (pure)."""
    source = f"no control plane: {cfg.local_xds_dir}" if cfg.local_xds_dir else f"xDS: {cfg.proxy.discovery_address}"
    hot_restart = f"base id {launch.base_id}, hot restart on" if launch.hot_restart else "hot restart off"
    return (
        f"proxy {cfg.proxy_type}, {source}; configPath {launch.config_dir}; ports: admin {cfg.proxy.proxy_admin_port}, "
        f"status {cfg.proxy.status_port}, readiness {cfg.envoy_status_port}, prometheus {cfg.envoy_prometheus_port}; "
        f"{hot_restart}; concurrency {launch.concurrency or 'Envoy default'}; Envoy log level {launch.log_level}; "
        f"drain {launch.drain_duration:g}s, termination drain {termination_drain:g}s"
    )


class StartupLine:
    """A supervisor service: logs the start-up line once Envoy's admin API answers (at most `wait` seconds)."""

    name = "start-up line"

    def __init__(
        self,
        admin: AdminClient,
        binary: str,
        summary: str,
        *,
        wait: float = 10.0,
        settled: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """run() waits for `settled` first (the start-up's first readiness answers go first)."""
        self.settled = settled
        self.admin = admin
        self.binary = binary
        self.summary = summary
        self.wait = wait

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def run(self) -> None:
        """Exit paths: returns after writing the line; cancellation (shutdown first) writes nothing."""
        if self.settled is not None:
            await self.settled()
        version = await self._envoy_version()
        envoy = f"Envoy {version} ({self.binary})" if version else f"Envoy {self.binary} (not answering yet)"
        log.info(
            "pilot-agent %s (follows Istio %s, tells istiod ISTIO_VERSION %s), %s; %s",
            __version__,
            istio_followed(),
            ISTIO_COMPAT_VERSION,
            envoy,
            self.summary,
        )

    async def _envoy_version(self) -> str | None:
        from agent.proxy.admin import AdminError  # noqa: PLC0415 (lazy: aiohttp loads after Envoy's exec)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        delay = 0.02
        while loop.time() < deadline:
            try:
                info = await self.admin.server_info(timeout=1.0)
            except AdminError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
                continue
            # "9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL"
            parts = str(info.get("version", "")).split("/")
            return parts[1] if len(parts) > 1 else None
        return None
