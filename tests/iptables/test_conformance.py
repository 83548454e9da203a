"""Istio's 27 istio-iptables goldens: our dry-run transcript equals each one exactly (after strip()).

Each case goes through the command's own path: the case's argv parsed by the real `pilot-agent` parser, its env,
then `istio_iptables.execute()`. Only the host facts (is the pod IPv6, the resolv.conf servers) are injected, as
the README of the goldens describes; `dns-uid-gid` needs its DNS server list verbatim (`::127.0.0.53`), which no
resolv.conf can produce, so that case passes its list straight in.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from agent.cli import build_parser
from agent.commands import istio_iptables
from agent.iptables.config import HostFacts, parse_resolv_conf
from tests.support.conformance import CONFORMANCE_DIR, conformance_dir

pytestmark = pytest.mark.conformance


def _cases() -> list[dict[str, Any]]:
    path = CONFORMANCE_DIR / "iptables" / "cases.json"
    try:
        return list(json.loads(path.read_text())["cases"])
    except OSError:
        return []


CASES = _cases()


def _host_facts(case: dict[str, Any]) -> HostFacts:
    environment = case["environment"]
    if case.get("cli_reproduces_golden_exactly", True):
        v4, v6 = parse_resolv_conf(environment.get("resolv_conf") or "")
    else:
        # The hook: the Go test puts this list into the struct verbatim.
        v4, v6 = tuple(environment["dns_servers_v4"]), tuple(environment["dns_servers_v6"])
    return HostFacts(ipv6=bool(environment["enable_ipv6"]), dns_servers_v4=v4, dns_servers_v6=v6)


def render_case(case: dict[str, Any], tmp_path: Path) -> str:
    argv = list(case["argv"])
    assert argv[0] == "istio-iptables"
    args = build_parser().parse_args(argv)
    env = {k: v for k, v in case["env"].items() if k != "DRY_RUN_FILE_PATH"}
    env["DRY_RUN_FILE_PATH"] = str(tmp_path / "dry-run.txt")
    out = io.StringIO()
    code = istio_iptables.execute(istio_iptables.given_flags(args), env, _host_facts(case), out)
    assert code == 0
    # The file Istio's stub writes gets the same transcript as stdout.
    assert (tmp_path / "dry-run.txt").read_text() == out.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_dry_run_matches_istio_golden(case: dict[str, Any], tmp_path: Path) -> None:
    golden = (conformance_dir("iptables") / case["golden"]).read_text()
    got = render_case(case, tmp_path)
    assert got.strip() == golden.strip()


def test_conformance_count(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Renders every case once more and prints "iptables conformance: N/27" for the report."""
    directory = conformance_dir("iptables")
    passed = 0
    for index, case in enumerate(CASES):
        scratch = tmp_path / str(index)
        scratch.mkdir()
        passed += render_case(case, scratch).strip() == (directory / case["golden"]).read_text().strip()
    with capsys.disabled():
        print(f"\niptables conformance: {passed}/{len(CASES)}")
    assert (passed, len(CASES)) == (27, 27)
