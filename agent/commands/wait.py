"""`pilot-agent wait`: poll Envoy's readiness until it answers 200 (Istio's app/wait.go semantics).

Loop: sleep one period, GET the URL, success iff the status is 200 and the body was read; give up after
--timeoutSeconds with `timeout waiting for Envoy proxy to become ready. Last error: ...` and exit WAIT_TIMEOUT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

import aiohttp

from agent.errors import ExitCode
from agent.flag_values import non_negative_int_flag
from agent.proxy.admin import cannot_connect

log = logging.getLogger("agent.cli")

DEFAULT_URL = "http://localhost:15021/healthz/ready"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "wait",
        help="wait until Envoy is ready (for a postStart hook)",
        description="Poll the readiness URL until it answers 200; exit 0 then, or 4 after --timeoutSeconds.",
    )
    parser.add_argument(
        "--timeoutSeconds", dest="timeout_seconds", type=str, default="60", help="give up after (default: %(default)s)"
    )
    parser.add_argument(
        "--requestTimeoutMillis",
        dest="request_timeout_millis",
        type=str,
        default="500",
        help="per request (default: %(default)s)",
    )
    parser.add_argument(
        "--periodMillis", dest="period_millis", type=str, default="500", help="between requests (default: %(default)s)"
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="readiness URL to poll (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    timeout = non_negative_int_flag(args.timeout_seconds, "--timeoutSeconds")
    request_timeout = non_negative_int_flag(args.request_timeout_millis, "--requestTimeoutMillis") / 1000
    period = non_negative_int_flag(args.period_millis, "--periodMillis") / 1000
    return asyncio.run(wait_ready(args.url, timeout, request_timeout, period))


async def wait_ready(url: str, timeout: float, request_timeout: float, period: float) -> int:
    log.info("Waiting for Envoy proxy to be ready (timeout: %g seconds)...", timeout)
    deadline = time.monotonic() + timeout
    last_error = "no request made"
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            # Istio sleeps first: the first probe happens one period after start.
            await asyncio.sleep(period)
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=request_timeout or None)) as resp:
                    await resp.read()
                    if resp.status == 200:
                        log.info("Envoy is ready!")
                        return ExitCode.OK
                    last_error = f"HTTP status code {resp.status}"
            except aiohttp.ClientConnectorError as exc:
                last_error = f"{cannot_connect(exc)}: is the agent running on {exc.host}:{exc.port}?"
            except TimeoutError:
                last_error = f"no answer from {url} within {request_timeout:g}s"
            except (aiohttp.ClientError, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            log.debug("Not ready yet: %s", last_error)
    log.error("timeout waiting for Envoy proxy to become ready. Last error: %s", last_error)
    return ExitCode.WAIT_TIMEOUT
