"""Istio's istio-iptables goldens: our dry-run transcript equals each one exactly (after strip()).

The goldens are read from Istio's module at the pinned version (tools/istio-iptables/pkg/capture/testdata); the
inputs behind each are in istio_golden_cases.yaml beside this file, written from Istio's TestIptables. Each case
goes through the command's own path: its Config fields become our command line (Istio's flags and env vars, the
table in docs/reference.md), parsed by the real `pilot-agent` parser, then `istio_iptables.execute()`.
Only what Istio reads from the machine rather than from flags (is the pod IPv6, the DNS servers) is injected as
`HostFacts`, the way the Go test sets those fields directly.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.cli import build_parser
from agent.commands import istio_iptables
from agent.iptables.config import HostFacts
from tests.support.istio import istio_source

pytestmark = pytest.mark.conformance

GOLDENS = "tools/istio-iptables/pkg/capture/testdata"
_TABLE = yaml.safe_load((Path(__file__).with_name("istio_golden_cases.yaml")).read_text())
BASE: dict[str, Any] = _TABLE["base"]
CASES: list[dict[str, Any]] = _TABLE["cases"]

# tools/common/config.Config field -> the flag that sets it (tools/istio-iptables/pkg/cmd/root.go).
_STRING_FLAGS = {
    "ProxyPort": "-p",
    "InboundCapturePort": "-z",
    "InboundTunnelPort": "-e",
    "ProxyUID": "-u",
    "ProxyGID": "-g",
    "InboundInterceptionMode": "-m",
    "InboundTProxyMark": "-t",
    "InboundTProxyRouteTable": "-r",
    "InboundPortsInclude": "-b",
    "InboundPortsExclude": "-d",
    "ExcludeInterfaces": "-c",
    "OutboundIPRangesInclude": "-i",
    "OutboundIPRangesExclude": "-x",
    "OutboundPortsInclude": "-q",
    "OutboundPortsExclude": "-o",
    "RerouteVirtualInterfaces": "-k",
}
_BOOL_FLAGS = {"RedirectDNS": "--redirect-dns", "DropInvalid": "--drop-invalid", "CaptureAllDNS": "--capture-all-dns"}
# Fields with no flag: env vars only.
_ENV_FIELDS = {
    "OwnerGroupsInclude": "ISTIO_OUTBOUND_OWNER_GROUPS",
    "OwnerGroupsExclude": "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    "HostIPv4LoopbackCidr": "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
}
# Fields Istio reads from the machine (interface addresses, resolv.conf), set directly by the Go test.
_HOST_FIELDS = {"EnableIPv6", "DNSServersV4", "DNSServersV6"}
# The transcript is the DependenciesStub's, which the CLI uses with --dry-run whatever DryRun the case sets.
_IGNORED = {"DryRun"}


def command_line(fields: dict[str, Any]) -> tuple[list[str], dict[str, str], HostFacts]:
    """A Go test's Config -> (argv, env, host facts) for `pilot-agent istio-iptables --dry-run`."""
    unknown = set(fields) - set(_STRING_FLAGS) - set(_BOOL_FLAGS) - set(_ENV_FIELDS) - _HOST_FIELDS - _IGNORED
    assert not unknown, f"Config fields this test does not map yet: {sorted(unknown)}"
    argv = ["istio-iptables"]
    for field, flag in _STRING_FLAGS.items():
        argv += [flag, str(fields.get(field, ""))]
    argv += [flag for field, flag in _BOOL_FLAGS.items() if fields.get(field)]
    argv.append("--dry-run")
    env = {name: str(fields.get(field, "")) for field, name in _ENV_FIELDS.items()}
    host = HostFacts(
        ipv6=bool(fields.get("EnableIPv6")),
        dns_servers_v4=tuple(fields.get("DNSServersV4") or ()),
        dns_servers_v6=tuple(fields.get("DNSServersV6") or ()),
    )
    return argv, env, host


def render_case(case: dict[str, Any], tmp_path: Path) -> str:
    argv, env, host = command_line(BASE | case["set"])
    args = build_parser().parse_args(argv)
    env["DRY_RUN_FILE_PATH"] = str(tmp_path / "dry-run.txt")
    out = io.StringIO()
    code = istio_iptables.execute(istio_iptables.given_flags(args), env, host, out)
    assert code == 0
    # The file Istio's stub writes gets the same transcript as stdout.
    assert (tmp_path / "dry-run.txt").read_text() == out.getvalue()
    return out.getvalue()


def golden(case: dict[str, Any]) -> str:
    return (istio_source(GOLDENS) / f"{case['name']}.golden").read_text()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_dry_run_matches_istio_golden(case: dict[str, Any], tmp_path: Path) -> None:
    assert render_case(case, tmp_path).strip() == golden(case).strip()


def test_every_istio_golden_has_a_case() -> None:
    """A golden added to Istio at a new pin shows up here until its inputs are written into the YAML."""
    goldens = {path.stem for path in istio_source(GOLDENS).glob("*.golden")}
    assert goldens == {case["name"] for case in CASES}


def test_conformance_count(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Renders every case once more and prints "iptables conformance: N/27" for the report."""
    passed = 0
    for index, case in enumerate(CASES):
        scratch = tmp_path / str(index)
        scratch.mkdir()
        passed += render_case(case, scratch).strip() == golden(case).strip()
    with capsys.disabled():
        print(f"\niptables conformance: {passed}/{len(CASES)}")
    assert (passed, len(CASES)) == (27, 27)
