"""`pilot-agent` command line: parse argv, configure logging, dispatch to a subcommand, map outcome to exit code.

Each subcommand lives in `agent/commands/<name>.py` and exposes `register(subparsers)`; the parser it adds sets
`run=<callable(args) -> int>`. Errors derived from AgentError become one log line and their exit code; nothing
prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from agent import __version__
from agent.commands import istio_iptables, proxy, render, request, version, wait
from agent.errors import AgentError, ExitCode
from agent.logs import configure

log = logging.getLogger("agent.cli")

COMMANDS = (proxy, wait, request, istio_iptables, version, render)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, the documented code, no usage dump wall.
        self.exit(ExitCode.USAGE, f"pilot-agent: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pilot-agent", description="Istio sidecar agent (Python).")
    parser.add_argument("--log_output_level", default="default:info", help="scope:level,... (Istio's form)")
    parser.add_argument("--log_as_json", action="store_true", help="log lines as JSON objects")
    parser.add_argument("--version", action="version", version=f"pilot-agent {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
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
