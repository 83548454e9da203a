"""`pilot-agent request METHOD PATH [BODY] [--debug-port 15000]`: an HTTP call to a local Istio port.

As Istio's (`pilot/cmd/pilot-agent/app/request.go`, `pilot/pkg/request/command.go`): only Envoy's admin port and
the agent's own ports are reachable (15000, 15020, 15021, 15004), the path's leading `/` is optional, the 60 s
client timeout, and stdout carries ONLY the response body (istioctl parses it as JSON). The native-sidecar preStop
hook is `pilot-agent request --debug-port=15020 POST drain`. A status above 399 other than 404 is a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from agent.errors import ExitCode
from agent.proxy.admin import AdminClient, AdminError, AdminUnreachable

log = logging.getLogger("agent.cli")

ALLOWED_PORTS = (15000, 15020, 15021, 15004)
TIMEOUT = 60.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "request", help="Makes an HTTP request to the Envoy admin API (or another local Istio port)"
    )
    parser.add_argument("method", help="HTTP method, e.g. GET or POST")
    parser.add_argument("path", help="path on the port, e.g. stats or /config_dump")
    parser.add_argument("body", nargs="?", default=None, help="request body")
    parser.add_argument(
        "--debug-port", type=int, default=15000, help=f"port to call, one of {', '.join(map(str, ALLOWED_PORTS))}"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.debug_port not in ALLOWED_PORTS:
        log.error("flag --debug-port: %d is not one of %s", args.debug_port, ", ".join(map(str, ALLOWED_PORTS)))
        return ExitCode.CONFIG_ERROR
    return request(args.method.upper(), args.path, args.body, port=args.debug_port)


def request(method: str, path: str, body: str | None, *, port: int, host: str = "127.0.0.1") -> int:
    client = AdminClient(host=host, port=port)
    data = body.encode() if body is not None else None
    try:
        status, payload = asyncio.run(client.request(method, "/" + path.lstrip("/"), data, timeout=TIMEOUT))
    except AdminUnreachable as exc:
        log.error("request %s %s failed: %s: is the agent running on %s:%d?", method, path, exc, host, port)
        return ExitCode.REQUEST_FAILED
    except AdminError as exc:
        log.error("request %s %s on port %d failed: %s", method, path, port, exc)
        return ExitCode.REQUEST_FAILED
    # Istio prints the body with fmt.Println: the body, then a newline.
    sys.stdout.buffer.write(payload + b"\n")
    sys.stdout.flush()
    if status > 399 and status != 404:
        log.error("request %s %s on port %d: HTTP status %d", method, path, port, status)
        return ExitCode.REQUEST_FAILED
    return ExitCode.OK
