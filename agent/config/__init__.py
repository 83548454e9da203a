"""Configuration: every source the agent reads, parsed into frozen dataclasses.

ConfigError (agent.errors) names the source (env var, file:line, flag) and the field for every bad input.

The names below load on first use: importing a light module of this package (env_settings, envvars, durations)
must not pull in PyYAML, psutil and the rest, so that `istio-iptables` and the status settings can read the
declared settings cheaply.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config.agent_config import AgentConfig, NodeOverrides, NodeSettings, load_agent_config
    from agent.config.durations import format_proto, parse_duration
    from agent.config.flags import ProxyFlags, add_proxy_flags, flags_from_args, split_component_log
    from agent.config.proxyconfig import ProxyConfig

_HOMES = {
    "AgentConfig": "agent.config.agent_config",
    "NodeOverrides": "agent.config.agent_config",
    "NodeSettings": "agent.config.agent_config",
    "load_agent_config": "agent.config.agent_config",
    "format_proto": "agent.config.durations",
    "parse_duration": "agent.config.durations",
    "ProxyFlags": "agent.config.flags",
    "add_proxy_flags": "agent.config.flags",
    "flags_from_args": "agent.config.flags",
    "split_component_log": "agent.config.flags",
    "ProxyConfig": "agent.config.proxyconfig",
}

__all__ = [
    "AgentConfig",
    "NodeOverrides",
    "NodeSettings",
    "ProxyConfig",
    "ProxyFlags",
    "add_proxy_flags",
    "flags_from_args",
    "format_proto",
    "load_agent_config",
    "parse_duration",
    "split_component_log",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
