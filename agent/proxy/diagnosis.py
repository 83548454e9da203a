"""Known ways Envoy fails to start, recognised from its own last lines, and what the operator should change.

Envoy says why it did not start only in its output, so this is the one place that reads Envoy's words. Each entry
is a failure no restart can cure while the host stays as it is: another process on the admin port, another Envoy
on the same base id, a shared-memory segment that is not ours. The agent answers with the fix and a fast exit
instead of a crash loop (docs/supervision.md, "Crashes"). Pure: lines in, one sentence out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StartContext:
    """What the agent asked Envoy for, to name the setting that fixes a clash."""

    admin_port: int
    base_id: int
    hot_restart: bool


# cannot bind '127.0.0.1:15000': Address already in use   (Envoy's admin listener, or a static listener)
_PORT_IN_USE = re.compile(r"cannot bind '(?P<address>[^']*):(?P<port>\d+)': Address already in use")
# unable to bind domain socket with base_id=150, id=0, errno=98 (see --base-id option)
_BASE_ID_TAKEN = re.compile(r"unable to bind domain socket with base_id=\d+, id=\d+, errno=98")
# panic: cannot open shared memory region /envoy_shared_memory_150 check user permissions. Error: Permission denied
_SHM_CLASH = re.compile(r"cannot open shared memory region (?P<name>\S+) check user permissions\. Error: (?P<why>.*)")

_OWN_BASE_ID = "give this agent its own ENVOY_BASE_ID (any number another Envoy on this host does not use)"


def admin_port_in_use(address: str, port: int) -> str:
    """The cause and the fix when Envoy's admin port is taken (found by Envoy, or by the agent before the exec)."""
    return (
        f"Envoy cannot start: its admin port {address}:{port} is already in use on this host (another "
        "Envoy, or another agent's); set ProxyConfig proxyAdminPort to a free port "
        "(e.g. PROXY_CONFIG='{proxyAdminPort: 16000}', or the pod annotation proxy.istio.io/config)"
    )


def listener_port_in_use(what: str, address: str, port: int, setting: str) -> str:
    """The cause and the fix when one of Envoy's own listeners (readiness, Prometheus) would share its port with
    another Envoy's (found by the agent before the exec: Envoy itself would start, SO_REUSEPORT)."""
    example = port + 1000 if port + 1000 <= 65535 else port - 1000
    return (
        f"Envoy not started: its {what} {address}:{port} is already in use on this host (another agent's Envoy? "
        "Envoy would share the port with it, and requests to it would reach either one); set "
        f"{setting} to a free port (e.g. {setting}={example})"
    )


def diagnose_start_failure(output: Sequence[str], context: StartContext) -> str | None:
    """The cause and the fix when `output` (Envoy's last lines) shows a known start-up failure, else None."""
    text = "\n".join(output)
    if match := _PORT_IN_USE.search(text):
        address, port = match["address"], int(match["port"])
        if port == context.admin_port:
            return admin_port_in_use(address, port)
        return (
            f"Envoy cannot start: {address}:{port}, where its bootstrap listens, is already in use by another "
            "process on this host"
        )
    if _BASE_ID_TAKEN.search(text):
        return (
            f"Envoy cannot start: another Envoy on this host already runs with base id {context.base_id} (its "
            f"hot-restart socket is taken); {_OWN_BASE_ID}, or set ENVOY_DISABLE_HOT_RESTART=true"
        )
    if match := _SHM_CLASH.search(text):
        return (
            f"Envoy cannot start: it cannot open its hot-restart shared memory /dev/shm{match['name']} "
            f"({match['why'].strip()}): it belongs to another Envoy or another user; {_OWN_BASE_ID}, or set "
            "ENVOY_DISABLE_HOT_RESTART=true"
        )
    return None


# [2026-12-02 04:26:34.088][22393][critical][main] [source/server/server.cc:76] error initializing ...
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\[\d+\]\[(?P<level>\w+)\]\[[^\]]*\] (?:\[[^\]]*\] )?")


def envoy_error(output: Sequence[str]) -> str:
    """Envoy's own words for why it failed: the last critical/error log message (its prefix stripped), else the
    last line that says error, else the last line."""
    for line in reversed(output):
        match = _LOG_PREFIX.match(line)
        if match and match["level"] in ("critical", "error"):
            return line[match.end() :].strip()
    for line in reversed(output):
        if "error" in line.lower():
            return line.strip()
    return output[-1].strip() if output else "no output"
