"""`pilot-agent istio-iptables`: install (or print, or remove) the sidecar's traffic-capture rules.

Flags and env vars are Istio's (`tools/istio-iptables/pkg/cmd/root.go`); see docs/reference.md. Exit codes:
0 done (or nothing to do), 1 (IPTABLES_FAILED) iptables missing or a rule set that could not be applied (the
namespace is left as it was), 77 (NOT_PERMITTED) not root / no CAP_NET_ADMIN, 78 (CONFIG_ERROR) a bad flag or env
var, named in the one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from agent.config.env_settings import DRY_RUN_FILE_PATH
from agent.errors import AgentError, ExitCode
from agent.iptables import apply as applying
from agent.iptables.config import (
    FLAGS,
    CaptureConfig,
    HostFacts,
    build_config,
    check_group_names,
    detect_host_facts,
    parse_bool,
)
from agent.iptables.rules import build_rules, dry_run_transcript

log = logging.getLogger("agent.iptables")

_NOT_SUPPLIED = None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "istio-iptables",
        help="set up the sidecar's iptables traffic capture",
        description="Install iptables rules that send a pod's inbound and outbound TCP through Envoy.",
    )
    for spec in FLAGS:
        names = [f"--{spec.long}"] + ([f"-{spec.short}"] if spec.short else [])
        if spec.is_bool:
            # pflag booleans: `--flag` or `--flag=false`.
            parser.add_argument(
                *names, dest=spec.dest, nargs="?", const="true", default=_NOT_SUPPLIED, metavar="BOOL", help=spec.help
            )
        else:
            env_help = f" (env {spec.env})" if spec.env_bound else ""
            parser.add_argument(*names, dest=spec.dest, default=_NOT_SUPPLIED, help=f"{spec.help}{env_help}")
    # Istio's injector appends the root's logging flags after the subcommand (`--log_output_level=default:info`);
    # accepted here so they apply, and only set when given so the root's values stay otherwise.
    parser.add_argument("--log_output_level", default=argparse.SUPPRESS, help="scope:level,... (Istio's form)")
    parser.add_argument("--log_as_json", action="store_true", default=argparse.SUPPRESS, help="log lines as JSON")
    parser.set_defaults(run=run)


def given_flags(args: argparse.Namespace) -> dict[str, object]:
    """The flags that were on the command line (others are None), booleans parsed."""
    given: dict[str, object] = {}
    for spec in FLAGS:
        value = getattr(args, spec.dest, None)
        if value is not None and spec.is_bool:
            value = parse_bool(str(value), f"flag --{spec.long}")
        given[spec.dest] = value
    return given


def run(args: argparse.Namespace) -> int:
    try:
        return execute(given_flags(args), os.environ, host=None, out=sys.stdout)
    except OSError as exc:
        # Anything the machine refuses outside the paths above (e.g. /proc unreadable) is still one line.
        raise AgentError(f"istio-iptables: {exc}", ExitCode.IPTABLES_FAILED) from None


def execute(
    given: Mapping[str, object],
    env: Mapping[str, str],
    host: HostFacts | None,
    out: TextIO,
    runner: applying.Runner | None = None,
) -> int:
    """The command's whole path. `host` None = read it from this machine (the CLI); tests pass it in."""
    cfg = build_config(given, env, HostFacts())
    if host is None:
        host = detect_host_facts(cfg.dual_stack, read_dns=cfg.redirect_dns and not cfg.capture_all_dns)
    cfg = dataclasses.replace(
        cfg, enable_ipv6=host.ipv6, dns_servers_v4=host.dns_servers_v4, dns_servers_v6=host.dns_servers_v6
    )
    if cfg.redirect_dns and not cfg.capture_all_dns and not (cfg.dns_servers_v4 or cfg.dns_servers_v6):
        log.warning(
            "REDIRECT_DNS is set, but CAPTURE_ALL_DNS is false, and no DNS servers provided. DNS capture disabled."
        )
    if cfg.run_validation:
        log.warning("--run-validation is not supported by this implementation; no validation probe was run")
    if cfg.dry_run:
        return _dry_run(cfg, env, out)
    if cfg.skip_rule_apply:
        log.info("--skip-rule-apply: not touching iptables")
        return ExitCode.OK
    if not cfg.cleanup_only:
        check_group_names(cfg)
    applying.require_privileges()
    plan = applying.Applier(cfg, runner or applying.SubprocessRunner())
    outcome = plan.cleanup() if cfg.cleanup_only else plan.apply()
    log.info("%s", outcome)
    return ExitCode.OK


def _dry_run(cfg: CaptureConfig, env: Mapping[str, str], out: TextIO) -> int:
    lines = applying.cleanup_plan_lines(cfg) if cfg.cleanup_only else dry_run_transcript(cfg, build_rules(cfg))
    text = "".join(line + "\n" for line in lines)
    out.write(text)
    out.flush()
    target = DRY_RUN_FILE_PATH.read(env)
    if target:
        try:
            # Istio opens the file without truncating it: each run appends.
            with Path(target).open("a", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise AgentError(
                f"{DRY_RUN_FILE_PATH.source}: cannot write {target}: {exc.strerror}", ExitCode.CONFIG_ERROR
            ) from None
    return ExitCode.OK
