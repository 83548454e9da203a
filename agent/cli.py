"""`pilot-agent` command line: parse argv, configure logging, dispatch to a subcommand, map outcome to exit code.

Each subcommand lives in `agent/commands/<name>.py` and exposes `register(subparsers)`; the parser it adds sets
`run=<callable(args) -> int>`. Errors derived from AgentError become one log line and their exit code; nothing
prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from agent import __version__
from agent.errors import AgentError, ExitCode
from agent.fdlimit import raise_open_files_limit
from agent.logs import configure

log = logging.getLogger("agent.cli")

# Subcommand name -> module. Only the module of the command being run is imported: `istio-iptables` runs as the
# pod's init container and `wait` as a postStart hook, and neither should pay for aiohttp and jinja2 (~300 ms).
COMMANDS = {
    "proxy": "agent.commands.proxy",
    "wait": "agent.commands.wait",
    "request": "agent.commands.request",
    "istio-iptables": "agent.commands.istio_iptables",
    "version": "agent.commands.version",
    "render": "agent.commands.render",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, the documented code, no usage dump wall.
        self.exit(ExitCode.USAGE, f"pilot-agent: error: {message}\n")


def _requested_command(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv, if it is one we know (flags before it take no separate value)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (with `only`) one that registers just that subcommand."""
    parser = _Parser(prog="pilot-agent", description="Istio sidecar agent (Python).")
    parser.add_argument("--log_output_level", default="default:info", help="scope:level,... (Istio's form)")
    parser.add_argument("--log_as_json", action="store_true", help="log lines as JSON objects")
    parser.add_argument("--version", action="version", version=f"pilot-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name, module in COMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # First, as Go's runtime does at init: a soft limit of 1024 open files starves the status port (issue 12).
    raise_open_files_limit()
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_requested_command(arguments))
    args, unknown = parser.parse_known_args(arguments)
    try:
        configure(args.log_output_level, args.log_as_json)
    except ValueError as exc:
        print(f"pilot-agent: flag --log_output_level: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if unknown:
        # Istio's cobra root whitelists unknown flags for backward compatibility: warn, do not fail.
        log.warning("ignoring unknown flags: %s", " ".join(unknown))
    try:
        return int(args.run(args))
    except AgentError as exc:
        log.error("%s", exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 128 + 2
