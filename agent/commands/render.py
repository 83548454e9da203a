"""`pilot-agent render [sidecar|router] [proxy flags...]`: print the Envoy bootstrap the agent would write.

Reads the same flags, environment and files as `pilot-agent proxy`, starts nothing, writes nothing. Bad input
is a ConfigError: one line naming source and field, exit code CONFIG_ERROR (78).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from agent.bootstrap import bootstrap_path, render_bootstrap
from agent.commands.proxy import startup_errors
from agent.config import add_proxy_flags, flags_from_args, load_agent_config
from agent.errors import ConfigError, ExitCode


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "render",
        aliases=["bootstrap"],
        help="print the Envoy bootstrap `proxy` would write, without starting anything",
        description=__doc__,
    )
    add_proxy_flags(parser)
    parser.add_argument(
        "--output", "-o", default="-", help="write to this file instead of stdout (no side files are written)"
    )
    parser.add_argument(
        "--print-path",
        action="store_true",
        help=(
            "print only the bootstrap path Istio names (<configPath>/envoy-rev.json); with hot restart on,"
            " `proxy` writes one file per epoch (envoy-rev<N>.json)"
        ),
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # The same one-line rule as `proxy` for what goes wrong reading the inputs (a path too long, unreadable).
    with startup_errors():
        cfg = load_agent_config(flags_from_args(args), os.environ)
        if args.print_path:
            print(bootstrap_path(cfg))
            return ExitCode.OK
        data = render_bootstrap(cfg)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return ExitCode.OK
    try:
        with open(args.output, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise ConfigError("flag --output", args.output, f"cannot write it: {exc.strerror or exc}") from None
    return ExitCode.OK
