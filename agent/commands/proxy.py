"""`pilot-agent proxy`: not built yet."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from agent.errors import ExitCode

log = logging.getLogger("agent.cli")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("proxy", help="(not built yet)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    log.error("the proxy command is not built yet")
    return ExitCode.NOT_IMPLEMENTED
