"""Real rules in a real network namespace: idempotent, removable, and never half-applied."""

from __future__ import annotations

import pytest

from agent.errors import AgentError, ExitCode
from agent.iptables.apply import Applier
from agent.iptables.config import HostFacts, build_config
from agent.iptables.rules import Rule, RuleSet, build_rules
from tests.iptables.conftest import INJECTOR_ARGS, add_foreign_rules
from tests.support.netns import NetnsRunner, PodNetwork, normalize_save

pytestmark = [pytest.mark.root, pytest.mark.netns]

TPROXY_ARGS = tuple("TPROXY" if a == "REDIRECT" else a for a in INJECTOR_ARGS)


def with_inbound_ports(args: tuple[str, ...], ports: str) -> tuple[str, ...]:
    """The injector's arguments with `-b` (inbound ports to capture) set to `ports`."""
    at = args.index("-b") + 1
    return (*args[:at], ports, *args[at + 1 :])


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("args", [INJECTOR_ARGS, TPROXY_ARGS], ids=["redirect", "tproxy"])
def test_applies_the_generated_rules_and_a_second_run_changes_nothing(pod: PodNetwork, args: tuple[str, ...]) -> None:
    add_foreign_rules(pod)
    first = pod.pilot_agent(*args)
    assert first.returncode == 0, first.stderr
    installed = normalize_save(pod.iptables_save())
    routes = pod.run(["ip", "rule"]).stdout, pod.run(["ip", "route", "show", "table", "133"]).stdout
    assert "-j ISTIO_INBOUND" in installed
    assert "--dport 15021 -j RETURN" in installed
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in installed

    second = pod.pilot_agent(*args)
    assert second.returncode == 0, second.stderr
    assert "nothing changed" in second.stderr
    assert normalize_save(pod.iptables_save()) == installed
    assert (pod.run(["ip", "rule"]).stdout, pod.run(["ip", "route", "show", "table", "133"]).stdout) == routes


def test_a_drifted_rule_order_is_detected(pod: PodNetwork) -> None:
    """Same rules, wrong order: 15021 moved behind the catch-all redirect would capture the health port."""
    assert pod.pilot_agent(*INJECTOR_ARGS).returncode == 0
    good = normalize_save(pod.iptables_save())
    rule = ["ISTIO_INBOUND", "-p", "tcp", "--dport", "15021", "-j", "RETURN"]
    assert pod.run(["iptables", "-t", "nat", "-D", *rule]).returncode == 0
    assert pod.run(["iptables", "-t", "nat", "-A", *rule]).returncode == 0
    drifted = normalize_save(pod.iptables_save())

    refused = pod.pilot_agent(*INJECTOR_ARGS)
    assert refused.returncode == ExitCode.IPTABLES_FAILED
    assert normalize_save(pod.iptables_save()) == drifted
    assert pod.pilot_agent(*INJECTOR_ARGS, "--reconcile").returncode == 0
    assert normalize_save(pod.iptables_save()) == good


@pytest.mark.parametrize("args", [INJECTOR_ARGS, TPROXY_ARGS], ids=["redirect", "tproxy"])
def test_cleanup_only_removes_exactly_what_was_installed(pod: PodNetwork, args: tuple[str, ...]) -> None:
    add_foreign_rules(pod)
    before = normalize_save(pod.iptables_save())
    rules_before = pod.run(["ip", "rule"]).stdout
    assert pod.pilot_agent(*args).returncode == 0
    assert normalize_save(pod.iptables_save()) != before
    if "TPROXY" in args:
        assert "fwmark 0x539 lookup 133" in pod.run(["ip", "rule"]).stdout
        assert "local default dev lo" in pod.run(["ip", "route", "show", "table", "133"]).stdout

    done = pod.pilot_agent(*args, "--cleanup-only")
    assert done.returncode == 0, done.stderr
    assert normalize_save(pod.iptables_save()) == before
    assert pod.run(["ip", "rule"]).stdout == rules_before
    assert pod.run(["ip", "route", "show", "table", "133"]).stdout == ""
    # Cleaning a clean namespace is fine too.
    assert pod.pilot_agent(*args, "--cleanup-only").returncode == 0
    assert normalize_save(pod.iptables_save()) == before


def test_different_existing_rules_are_left_alone_unless_reconcile(pod: PodNetwork) -> None:
    add_foreign_rules(pod)
    assert pod.pilot_agent(*INJECTOR_ARGS).returncode == 0
    old = normalize_save(pod.iptables_save())
    changed = with_inbound_ports(INJECTOR_ARGS, "8080")

    refused = pod.pilot_agent(*changed)
    assert refused.returncode == ExitCode.IPTABLES_FAILED
    assert "--reconcile" in one_line_error(refused.stderr)
    assert normalize_save(pod.iptables_save()) == old

    replaced = pod.pilot_agent(*changed, "--reconcile")
    assert replaced.returncode == 0, replaced.stderr
    reconciled = normalize_save(pod.iptables_save())
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT" in reconciled
    assert "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" not in reconciled

    # The result is exactly what a fresh install of the new arguments gives.
    assert pod.pilot_agent(*changed, "--cleanup-only").returncode == 0
    assert pod.pilot_agent(*changed).returncode == 0
    assert normalize_save(pod.iptables_save()) == reconciled
    # --force-apply replaces even identical rules, and ends in the same state.
    assert pod.pilot_agent(*changed, "--force-apply").returncode == 0
    assert normalize_save(pod.iptables_save()) == reconciled


def test_a_rule_the_kernel_refuses_leaves_the_namespace_as_it_was(pod: PodNetwork) -> None:
    """TPROXY writes mangle, nat and raw; a REDIRECT target in raw is refused by the kernel (EINVAL) after mangle
    and nat were committed, so only the snapshot rollback can put things back."""
    add_foreign_rules(pod)
    before = normalize_save(pod.iptables_save())
    given = {"istio_inbound_interception_mode": "TPROXY", "istio_inbound_ports": "*", "istio_service_cidr": "*"}
    cfg = build_config(given, {}, HostFacts())
    refused = Rule("raw", "OUTPUT", ("-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "1"))
    runner = NetnsRunner(pod)
    with pytest.raises(AgentError) as caught:
        Applier(cfg, runner, RuleSet((*build_rules(cfg).v4, refused), ())).apply()
    assert caught.value.exit_code == ExitCode.IPTABLES_FAILED
    assert "Invalid argument" in str(caught.value)
    # A flushing restore (the rollback) really ran, and the state is the snapshot's.
    assert any(call[0].endswith("-restore") and "--noflush" not in call for call in runner.calls)
    assert normalize_save(pod.iptables_save()) == before
    assert "lookup 133" not in pod.run(["ip", "rule"]).stdout


def test_a_failing_table_through_the_cli_applies_nothing(pod: PodNetwork) -> None:
    """Another component's chain jumps into our nat ISTIO_OUTPUT: --reconcile may not delete that jump (not ours),
    so deleting the chain fails the nat block after the mangle block was committed."""
    assert pod.pilot_agent(*TPROXY_ARGS).returncode == 0
    for argv in (["-N", "FOREIGN"], ["-A", "FOREIGN", "-j", "ISTIO_OUTPUT"]):
        assert pod.run(["iptables", "-t", "nat", *argv]).returncode == 0
    before = normalize_save(pod.iptables_save())
    changed = with_inbound_ports(TPROXY_ARGS, "8080")
    done = pod.pilot_agent(*changed, "--reconcile")
    assert done.returncode == ExitCode.IPTABLES_FAILED
    assert "restored to their previous state" in one_line_error(done.stderr)
    assert normalize_save(pod.iptables_save()) == before


def add_other_components_chains(pod: PodNetwork) -> None:
    """ISTIO_* chains that are not ours (another component's: ambient, a CNI plugin, an operator), with jumps from
    built-in chains, in the filter and nat tables; one has the name of a chain we use, in a table where we don't."""
    for table, chain, jump_from in (
        ("filter", "ISTIO_FIREWALL", "INPUT"),
        ("nat", "ISTIO_AMBIENT_PRERT", "PREROUTING"),
        ("filter", "ISTIO_OUTPUT", "OUTPUT"),
    ):
        for argv in (["-N", chain], ["-A", chain, "-p", "udp", "--dport", "9998", "-j", "RETURN"],
                     ["-A", jump_from, "-p", "udp", "-j", chain]):  # fmt: skip
            done = pod.run(["iptables", "-t", table, *argv])
            assert done.returncode == 0, done.stderr


def test_other_components_istio_chains_are_never_touched(pod: PodNetwork) -> None:
    add_foreign_rules(pod)
    add_other_components_chains(pod)
    before = normalize_save(pod.iptables_save())
    installed = pod.pilot_agent(*INJECTOR_ARGS)
    assert installed.returncode == 0, installed.stderr
    state = normalize_save(pod.iptables_save())
    assert "-A ISTIO_FIREWALL -p udp -m udp --dport 9998 -j RETURN" in state
    assert "nothing changed" in pod.pilot_agent(*INJECTOR_ARGS).stderr
    changed = with_inbound_ports(INJECTOR_ARGS, "8080")
    assert pod.pilot_agent(*changed, "--reconcile").returncode == 0
    reconciled = normalize_save(pod.iptables_save())
    for line in before.splitlines():
        assert line in reconciled, line
    assert pod.pilot_agent(*changed, "--cleanup-only").returncode == 0
    assert normalize_save(pod.iptables_save()) == before


def test_tproxy_without_inbound_capture_adds_no_policy_routing(pod: PodNetwork) -> None:
    """Istio sets up `ip rule`/`ip route` for TPROXY only when inbound ports are captured; cleanup then has none
    to remove either."""
    rules_before = pod.run(["ip", "rule"]).stdout
    no_inbound = with_inbound_ports(TPROXY_ARGS, "")
    assert pod.pilot_agent(*no_inbound).returncode == 0
    assert pod.run(["ip", "rule"]).stdout == rules_before
    assert pod.run(["ip", "route", "show", "table", "133"]).stdout == ""
    assert pod.pilot_agent(*no_inbound, "--cleanup-only").returncode == 0
    assert pod.run(["ip", "rule"]).stdout == rules_before


def test_not_root_is_not_permitted(pod: PodNetwork) -> None:
    done = pod.pilot_agent(*INJECTOR_ARGS, uid=65534)
    assert done.returncode == ExitCode.NOT_PERMITTED
    assert "needs CAP_NET_ADMIN" in one_line_error(done.stderr)
    assert "ISTIO" not in pod.iptables_save()


def test_missing_iptables_binary_is_a_clear_error(pod: PodNetwork) -> None:
    done = pod.pilot_agent(*INJECTOR_ARGS, env={"PATH": "/nonexistent"})
    assert done.returncode == ExitCode.IPTABLES_FAILED
    assert "iptables-restore and iptables-save not found in PATH" in one_line_error(done.stderr)
    assert "ISTIO" not in pod.iptables_save()


def test_ipv6_pod_gets_both_families_and_cleanup_removes_both(pod: PodNetwork) -> None:
    added = pod.run(["ip", "addr", "add", "fd00:10::2/64", "dev", pod.pod_if, "nodad"])
    assert added.returncode == 0, added.stderr
    add_foreign_rules(pod)
    before = normalize_save(pod.iptables_save()), normalize_save(pod.iptables_save(6))
    # IPv6 is detected from the pod's addresses (--dual-stack: any IPv6 address), as Istio does.
    assert pod.pilot_agent(*INJECTOR_ARGS, "--dual-stack").returncode == 0
    v6 = normalize_save(pod.iptables_save(6))
    assert "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN" in v6
    assert "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" in v6
    assert " ::6/128 " in pod.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout
    again = pod.pilot_agent(*INJECTOR_ARGS, "--dual-stack")
    assert "nothing changed (IPv4, IPv6)" in again.stderr
    assert pod.pilot_agent(*INJECTOR_ARGS, "--dual-stack", "--cleanup-only").returncode == 0
    assert (normalize_save(pod.iptables_save()), normalize_save(pod.iptables_save(6))) == before


def test_dns_capture_rules_from_resolv_conf_apply_and_clean_up(pod: PodNetwork) -> None:
    pod.set_resolv_conf("search svc.cluster.local\nnameserver 10.10.0.53\n")
    add_foreign_rules(pod)
    before = normalize_save(pod.iptables_save())
    assert pod.pilot_agent(*INJECTOR_ARGS, "--redirect-dns").returncode == 0
    installed = normalize_save(pod.iptables_save())
    assert "-A ISTIO_OUTPUT_DNS -d 10.10.0.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in installed
    assert "-A ISTIO_INBOUND -s 10.10.0.53/32 -p udp -m udp --sport 53 -j CT --zone 1" in installed
    assert "nothing changed" in pod.pilot_agent(*INJECTOR_ARGS, "--redirect-dns").stderr
    assert pod.pilot_agent(*INJECTOR_ARGS, "--redirect-dns", "--cleanup-only").returncode == 0
    assert normalize_save(pod.iptables_save()) == before


def test_legacy_backend_is_used_when_it_holds_the_rules(pod: PodNetwork) -> None:
    """A node whose kube-proxy/CNI uses iptables-legacy: our rules must go to the same backend."""
    foreign = pod.run(["iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN"])
    if foreign.returncode != 0:
        pytest.skip(f"iptables-legacy is not usable here: {foreign.stderr.strip()}")
    before = normalize_save(pod.run(["iptables-legacy-save"]).stdout)
    first = pod.pilot_agent(*INJECTOR_ARGS)
    assert first.returncode == 0, first.stderr
    assert "legacy backend" in first.stderr
    installed = normalize_save(pod.run(["iptables-legacy-save"]).stdout)
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in installed
    assert "ISTIO" not in pod.run(["iptables-nft-save"]).stdout
    assert "nothing changed" in pod.pilot_agent(*INJECTOR_ARGS).stderr
    assert pod.pilot_agent(*INJECTOR_ARGS, "--cleanup-only").returncode == 0
    assert normalize_save(pod.run(["iptables-legacy-save"]).stdout) == before
