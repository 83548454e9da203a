"""Before epoch 0 is exec'd: is something on this host already listening where our Envoy must? (No event loop: this
runs before the agent's heavier imports, see agent/commands/proxy.py.)"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Iterable, Mapping

from agent.errors import AgentError, ExitCode
from agent.proxy.diagnosis import admin_port_in_use, listener_port_in_use


def check_admin_port(port: int, host: str = "127.0.0.1") -> None:
    """Before epoch 0 is exec'd: raise AgentError(STARTUP_FAILED) when something listens on the admin port already.
    Another agent's Envoy there would answer the agent's admin client as if it were ours ("LIVE"), then ours fails to
    bind and the agent crash-loops on it."""
    if port_taken(host, port):
        raise AgentError(admin_port_in_use(host, port), ExitCode.STARTUP_FAILED)


def check_listener_ports(bootstrap: bytes, settings: Mapping[int, tuple[str, str]]) -> None:
    """Before epoch 0 is exec'd: raise AgentError(STARTUP_FAILED) when an address of the bootstrap's static listeners
    on one of `settings`' ports (port: (what it is, the setting that moves it)) is taken. Envoy binds its listeners
    with SO_REUSEPORT: beside another agent's Envoy on 15021 or 15090 it starts, and the two share the port (the
    kernel spreads connections between them: readiness probes answer for either agent). Envoy binds its admin port
    without it, and fails there by itself."""
    for address, port in static_listener_addresses(bootstrap, settings.keys()):
        if port_taken(address, port):
            what, setting = settings[port]
            raise AgentError(listener_port_in_use(what, address, port, setting), ExitCode.STARTUP_FAILED)


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on host:port already. One bind without SO_REUSEPORT, so that a listener that has it
    (an Envoy's) is found too; with SO_REUSEADDR, as Envoy's, so that a port left in TIME_WAIT is free; an IPv6
    address v6-only, as Envoy binds it. Any other failure (no such address in this namespace, ...) is Envoy's to
    report when it binds: False."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ":" in host:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def static_listener_addresses(bootstrap: bytes, ports: Iterable[int]) -> list[tuple[str, int]]:
    """The addresses (with `additional_addresses`) of the bootstrap's static listeners on `ports`: [] when the
    bootstrap is not JSON (a custom template's YAML: Envoy's to bind and report)."""
    wanted = {port for port in ports if port > 0}
    try:
        document = json.loads(bootstrap)
        listeners = document["static_resources"]["listeners"]
    except (ValueError, KeyError, TypeError):
        return []
    found = []
    for listener in listeners if isinstance(listeners, list) else ():
        if not isinstance(listener, dict):
            continue
        entries = [listener, *listener.get("additional_addresses", ())]
        for entry in entries:
            address = entry.get("address", {}).get("socket_address") if isinstance(entry, dict) else None
            if isinstance(address, dict) and address.get("port_value") in wanted:
                found.append((str(address.get("address", "")), int(address["port_value"])))
    return found
