"""`pilot-agent version [--short] [-o yaml|json]`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent import __version__


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("version", help="print the agent's version")
    parser.add_argument("-s", "--short", action="store_true", help="only the version number")
    parser.add_argument("-o", "--output", choices=("yaml", "json"), default=None)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = {"clientVersion": {"version": __version__, "implementation": "python"}}
    if args.short:
        print(__version__)
    elif args.output == "json":
        print(json.dumps(info, indent=2))
    elif args.output == "yaml":
        print(f"clientVersion:\n  implementation: python\n  version: {__version__}")
    else:
        print(f"client version: {__version__} (python)")
    return 0
