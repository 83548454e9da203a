"""Numbers as Go's strconv reads them, and flag value parsing shared by `pilot-agent proxy` (agent.config.flags)
and `pilot-agent wait`.

It lives outside agent.config on purpose: importing anything in that package loads all of it (PyYAML included),
and `wait` runs as a postStart hook that should import little.
"""

from __future__ import annotations

import re
from typing import Any

from agent.errors import ConfigError

# Go's strconv.Atoi: an optional sign and ASCII digits. Python's int() also takes blanks, underscores and every
# Unicode digit ("²" passes str.isdigit() and fails int(); "٤٥" is 45 to int()): Go refuses all of them.
_GO_INT = re.compile(r"[+-]?[0-9]+")


def go_atoi(text: str) -> int:
    """Go's strconv.Atoi (base 10, no blanks); ValueError otherwise."""
    if not _GO_INT.fullmatch(text):
        raise ValueError(f"invalid syntax: {text!r}")
    return int(text)


def non_negative_int_flag(value: Any, flag: str) -> int:
    """`value` (a string, or a default of another type) as an integer >= 0; ConfigError naming `flag` otherwise."""
    try:
        result = go_atoi(str(value).strip())
    except ValueError:
        raise ConfigError(f"flag {flag}", "", f"expected an integer, got {value!r}") from None
    if result < 0:
        raise ConfigError(f"flag {flag}", "", f"must not be negative, got {result}")
    return result
