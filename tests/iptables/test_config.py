"""Flags and env vars -> CaptureConfig: Istio's precedence, and one clear error naming the source for bad input."""

from __future__ import annotations

import grp
import io
import subprocess
import sys

import pytest

from agent.cli import build_parser
from agent.commands import istio_iptables
from agent.errors import ConfigError, ExitCode
from agent.iptables.apply import RecordingRunner
from agent.iptables.config import CaptureConfig, HostFacts, build_config, parse_resolv_conf
from tests.support.netns import REPO_ROOT


def config_from(argv: list[str], env: dict[str, str] | None = None) -> CaptureConfig:
    args = build_parser().parse_args(["istio-iptables", *argv])
    return build_config(istio_iptables.given_flags(args), env or {}, HostFacts())


def test_defaults_are_istios() -> None:
    cfg = build_config({}, {}, HostFacts())
    assert (cfg.proxy_port, cfg.inbound_capture_port, cfg.inbound_tunnel_port) == ("15001", "15006", "15008")
    assert (cfg.proxy_uid, cfg.proxy_gid, cfg.mode) == ("1337", "1337", "REDIRECT")
    assert (cfg.tproxy_mark, cfg.tproxy_route_table) == ("1337", "133")
    assert (cfg.owner_groups_include, cfg.host_ipv4_loopback_cidr) == ("*", "127.0.0.1/32")


def test_env_is_used_when_the_flag_is_absent_and_the_flag_wins_when_present() -> None:
    env = {"INBOUND_CAPTURE_PORT": "16006", "ISTIO_INBOUND_PORTS": "8080", "ISTIO_SERVICE_EXCLUDE_CIDR": "10.0.0.0/8"}
    cfg = config_from(["-b", "*"], env)
    assert cfg.inbound_capture_port == "16006"
    # -p has no env var in Istio (flag.Bind, not BindEnv): ENVOY_PORT is ignored.
    assert config_from([], {"ENVOY_PORT": "16001"}).proxy_port == "15001"
    assert cfg.inbound_ports_include == "*"
    # An explicitly empty flag still wins over the env var (viper: the flag was "changed").
    assert config_from(["-x", ""], env).outbound_ip_ranges_exclude == ""


def test_gid_defaults_to_uid_and_booleans_read_env_forms() -> None:
    cfg = config_from(["-u", "2000"], {"ISTIO_META_DNS_CAPTURE": "true", "INVALID_DROP": "1"})
    assert (cfg.proxy_gid, cfg.redirect_dns, cfg.drop_invalid) == (
        "2000", True, True,
    )  # fmt: skip
    assert config_from(["--redirect-dns=false"], {"ISTIO_META_DNS_CAPTURE": "true"}).redirect_dns is False


@pytest.mark.parametrize(
    ("argv", "env", "source"),
    [
        (["-i", "10.0.0.0/33"], {}, "flag -i/--istio-service-cidr"),
        (["-x", "not-a-cidr"], {}, "flag -x/--istio-service-exclude-cidr"),
        (["-x", "*"], {}, "flag -x/--istio-service-exclude-cidr"),
        (["-p", "70000"], {}, "flag -p/--envoy-port"),
        (["-z", "http"], {}, "flag -z/--inbound-capture-port"),
        (["-d", "15020,9000:8000"], {}, "flag -d/--istio-local-exclude-ports"),
        (["-b", "80-90"], {}, "flag -b/--istio-inbound-ports"),
        (["-m", "tproxy"], {}, "flag -m/--istio-inbound-interception-mode"),
        (["-u", "envoy"], {}, "flag -u/--proxy-uid"),
        (["-g", "-5"], {}, "flag -g/--proxy-gid"),
        (["-t", "0x539"], {}, "flag -t/--istio-inbound-tproxy-mark"),
        # Unicode digits: str.isdigit() takes them, int() refuses "²" and reads "٤٥" as 45; Go refuses both.
        (["-p", "²"], {}, "flag -p/--envoy-port"),
        (["-d", "15020,٤٥"], {}, "flag -d/--istio-local-exclude-ports"),
        (["-u", "¹³³⁷"], {}, "flag -u/--proxy-uid"),
        (["-r", "١٣٣"], {}, "flag -r/--istio-inbound-tproxy-route-table"),
        ([], {"ISTIO_SERVICE_CIDR": "300.1.1.1/8"}, "env ISTIO_SERVICE_CIDR"),
        ([], {"ISTIO_INBOUND_INTERCEPTION_MODE": "NAT"}, "env ISTIO_INBOUND_INTERCEPTION_MODE"),
        ([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "::1/128"}, "env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"),
        ([], {"REDIRECT_DNS": "sometimes"}, "env REDIRECT_DNS"),
        ([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "java,has space"}, "env ISTIO_OUTBOUND_OWNER_GROUPS"),
        ([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "2000-1000"}, "env ISTIO_OUTBOUND_OWNER_GROUPS"),
        ([], {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(map(str, range(65)))}, "env ISTIO_OUTBOUND_OWNER_GROUPS"),
        # TPROXY: mark 0 matches every unmarked packet; 0/253/254/255 are the kernel's own routing tables.
        (["-m", "TPROXY", "-t", "0"], {}, "flag -t/--istio-inbound-tproxy-mark"),
        *(
            (["-m", "TPROXY", "-r", table], {}, "flag -r/--istio-inbound-tproxy-route-table")
            for table in ("0", "253", "254", "255")
        ),
        (
            [],
            {"ISTIO_INBOUND_INTERCEPTION_MODE": "TPROXY", "ISTIO_INBOUND_TPROXY_MARK": "0"},
            "env ISTIO_INBOUND_TPROXY_MARK",
        ),
    ],
)
def test_bad_input_names_its_source(argv: list[str], env: dict[str, str], source: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from(argv, env)
    assert str(caught.value).startswith(source)
    assert "\n" not in str(caught.value)


def test_tproxy_numbers_are_free_in_redirect_mode_where_they_mean_nothing() -> None:
    """Istio ignores -t and -r unless the mode is TPROXY; so do we (its dry-run output stays ours)."""
    cfg = config_from(["-m", "REDIRECT", "-t", "0", "-r", "254"])
    assert (cfg.tproxy_mark, cfg.tproxy_route_table) == ("0", "254")


def test_owner_groups_take_gids_ranges_and_names() -> None:
    env = {"ISTIO_OUTBOUND_OWNER_GROUPS": "1337,1000-2000,root"}
    assert config_from([], env).owner_groups_include == "1337,1000-2000,root"


def test_an_owner_group_that_does_not_exist_is_exit_78_before_any_iptables_call() -> None:
    """Istio passes the name to iptables-restore, which fails on the nat table after mangle was committed (exit 1
    after a rollback here). The name is checked where iptables would resolve it, before anything runs."""
    with pytest.raises(KeyError):
        grp.getgrnam("abc")
    env = {"ISTIO_OUTBOUND_OWNER_GROUPS": "1337,abc"}
    runner = RecordingRunner(available=frozenset({"iptables-nft-save", "iptables-nft-restore"}))
    with pytest.raises(ConfigError) as caught:
        istio_iptables.execute({}, env, HostFacts(), io.StringIO(), runner)
    assert caught.value.exit_code == ExitCode.CONFIG_ERROR
    assert str(caught.value) == "env ISTIO_OUTBOUND_OWNER_GROUPS: no group named 'abc' in this container"
    assert runner.calls == []
    # A dry run prints Istio's rules for it, as Istio does: whether the name exists is the target pod's matter.
    out = io.StringIO()
    assert istio_iptables.execute({"dry_run": True}, env, HostFacts(), out) == ExitCode.OK
    assert "-A ISTIO_OUTPUT -m owner ! --gid-owner 1337 -m owner ! --gid-owner abc -j RETURN" in out.getvalue()


def test_port_ranges_and_wildcards_are_accepted() -> None:
    cfg = config_from(["-b", "*", "-d", "15020,20000:20010", "-q", "443", "-o", "25:26", "-i", "*"])
    assert cfg.inbound_ports_exclude == "15020,20000:20010"


def test_resolv_conf_servers_are_split_and_canonical() -> None:
    text = "search x\nnameserver 10.96.0.10\nnameserver ::127.0.0.53\nnameserver fd00::A\n# nameserver 1.1.1.1\n"
    assert parse_resolv_conf(text) == (("10.96.0.10",), ("::7f00:35", "fd00::a"))


def test_dry_run_prints_the_transcript() -> None:
    out = io.StringIO()
    args = build_parser().parse_args(["istio-iptables", "-b", "*", "-d", "15020", "-i", "*", "-n"])
    assert istio_iptables.execute(istio_iptables.given_flags(args), {}, HostFacts(), out) == 0
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["iptables-save", "ip6tables-save", "* nat"]
    assert "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN" in lines
    assert lines[-1] == "iptables-save"


def test_cli_bad_flag_exits_78_with_one_line_and_no_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "istio-iptables", "-i", "10.0.0.0/40", "-n"],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == ExitCode.CONFIG_ERROR
    assert done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "flag -i/--istio-service-cidr" in errors[0]
    assert "Traceback" not in done.stderr
