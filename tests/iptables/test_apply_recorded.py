"""Decisions of the applier that need no kernel: which backend, what one run sends. A RecordingRunner stands in
for the binaries here because the choice between two installed backends cannot be staged on one machine."""

from __future__ import annotations

import pytest

from agent.iptables.apply import Applier, IptablesError, RecordingRunner, Result, detect_binaries
from agent.iptables.config import HostFacts, build_config
from agent.iptables.rules import V4, V6, build_rules, restore_text

BOTH = frozenset(
    f"{base}-{variant}-{verb}" for base in ("iptables", "ip6tables") for variant in ("nft", "legacy")
    for verb in ("save", "restore")
)  # fmt: skip
SOME_RULES = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n"


def test_the_backend_that_already_has_rules_wins() -> None:
    runner = RecordingRunner(available=BOTH, responses=[(("iptables-legacy-save",), Result(0, SOME_RULES))])
    assert detect_binaries(runner, V4).restore == "iptables-legacy-restore"


def test_nft_is_preferred_when_neither_or_both_have_rules() -> None:
    assert detect_binaries(RecordingRunner(available=BOTH), V4).restore == "iptables-nft-restore"
    both = RecordingRunner(available=BOTH, responses=[((), Result(0, SOME_RULES))])
    assert detect_binaries(both, V6).restore == "ip6tables-nft-restore"


def test_plain_binaries_are_used_when_no_variant_exists() -> None:
    runner = RecordingRunner(available=frozenset({"iptables-save", "iptables-restore"}))
    assert detect_binaries(runner, V4).backend == "default"


def test_no_binaries_is_a_clear_error() -> None:
    with pytest.raises(IptablesError, match="iptables-restore and iptables-save not found in PATH"):
        detect_binaries(RecordingRunner(), V4)


def test_clean_namespace_gets_one_noflush_restore_with_the_generated_text() -> None:
    cfg = build_config({"istio_inbound_ports": "*", "istio_service_cidr": "*"}, {}, HostFacts())
    runner = RecordingRunner(available=BOTH)
    Applier(cfg, runner).apply()
    restores = [(argv, stdin) for argv, stdin in runner.calls if argv[0].endswith("-restore")]
    assert restores == [(("iptables-nft-restore", "--noflush"), restore_text(build_rules(cfg).v4))]


def test_a_failing_route_step_undoes_the_earlier_ones_and_the_rules() -> None:
    given = {"istio_inbound_interception_mode": "TPROXY", "istio_inbound_ports": "*", "istio_service_cidr": "*"}
    cfg = build_config(given, {}, HostFacts())
    failing = (("ip", "-4", "route", "add"), Result(2, "", "RTNETLINK answers: No such device"))
    runner = RecordingRunner(available=BOTH, responses=[failing])
    with pytest.raises(IptablesError, match="ip -4 route add local default dev lo table 133 failed"):
        Applier(cfg, runner).apply()
    argvs = [argv for argv, _ in runner.calls]
    assert ("ip", "-4", "rule", "add", "fwmark", "1337", "lookup", "133") in argvs
    # The rule that did get added is deleted again, then the tables are put back from the snapshot.
    undo = argvs.index(("ip", "-4", "rule", "del", "fwmark", "1337", "lookup", "133"))
    rollback = [i for i, argv in enumerate(argvs) if argv == ("iptables-nft-restore",)]
    assert rollback and rollback[0] > undo
