"""Configuration: every source the agent reads, parsed into frozen dataclasses.

ConfigError (agent.errors) names the source (env var, file:line, flag) and the field for every bad input.
"""

from agent.config.agent_config import AgentConfig, NodeOverrides, NodeSettings, load_agent_config
from agent.config.durations import format_proto, parse_duration
from agent.config.flags import ProxyFlags, add_proxy_flags, flags_from_args, split_component_log
from agent.config.proxyconfig import ProxyConfig

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
