"""Flag value parsing shared by `pilot-agent proxy` (agent.config.flags) and `pilot-agent wait`.

It lives outside agent.config on purpose: importing anything in that package loads all of it (PyYAML included),
and `wait` runs as a postStart hook that should import little.
"""

from __future__ import annotations

from typing import Any

from agent.errors import ConfigError


def non_negative_int_flag(value: Any, flag: str) -> int:
    """`value` (a string, or a default of another type) as an integer >= 0; ConfigError naming `flag` otherwise."""
    try:
        result = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"flag {flag}", "", f"expected an integer, got {value!r}") from None
    if result < 0:
        raise ConfigError(f"flag {flag}", "", f"must not be negative, got {result}")
    return result
