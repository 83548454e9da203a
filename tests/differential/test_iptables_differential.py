"""`istio-iptables --dry-run`: Istio's binary and ours give the same transcript for generated flag and env sets.

Both run against the same host: a network namespace shaped like a pod with IPv4, IPv6 or both addresses (Istio
detects the pod's IP family from its interfaces) and a resolv.conf drawn with the case (read for DNS capture).
Istio's binary runs in it through `ip netns exec`, which mounts the namespace's /etc/netns/<ns>/resolv.conf over
/etc/resolv.conf; ours runs the command's own path (argv parsed by the real parser, `istio_iptables.execute`) on a
thread inside the namespace, with the host facts read from the same interfaces and the same resolv.conf file.

Differences that are deliberate (README, "Traffic capture"): values Istio does not check (ports, uids, marks, interface
names, modes) are exit 78 here; `test_invalid_inputs_istio_accepts` pins a few of them so a change on either side
shows up.
"""

from __future__ import annotations

import contextlib
import io
import secrets
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given

from agent.cli import build_parser
from agent.commands import istio_iptables
from agent.errors import AgentError
from agent.iptables.config import HostFacts, build_config, detect_host_facts
from tests.conftest import require_root
from tests.differential.budget import differential
from tests.differential.iptables_inputs import HOSTS, Invocation, rejected_by_both, valid_invocations
from tests.support.istio import istio_binary
from tests.support.probes import enter_netns

pytestmark = [pytest.mark.istio, pytest.mark.root, pytest.mark.netns]

ADDRESSES = {"v4": ["10.77.0.2/24"], "v6": ["fd00:77::2/64"], "dual": ["10.77.0.2/24", "fd00:77::2/64"]}


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    transcript: str
    detail: str


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One namespace per host shape: a veth pair (no dummy module here) with the addresses (IPv6 without duplicate
    detection, so usable at once), and an /etc/netns/<ns> directory for its resolv.conf."""
    require_root()
    token = secrets.token_hex(3)
    created: dict[str, str] = {}
    try:
        for shape in HOSTS:
            name = f"ipdiff-{shape}-{token}"
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
            created[shape] = name
            for step in (["link", "add", "d0", "type", "veth", "peer", "name", "d1"], ["link", "set", "d0", "up"]):
                subprocess.run(["ip", "-n", name, *step], check=True, capture_output=True)
            for address in ADDRESSES[shape]:
                extra = ["nodad"] if ":" in address else []
                subprocess.run(["ip", "-n", name, "addr", "add", address, "dev", "d0", *extra], check=True)
            Path("/etc/netns", name).mkdir(parents=True, exist_ok=True)
        yield created
    finally:
        for name in created.values():
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
            with contextlib.suppress(OSError):
                (Path("/etc/netns", name) / "resolv.conf").unlink()
                Path("/etc/netns", name).rmdir()


def _resolv_conf(namespace: str, nameservers: tuple[str, ...]) -> Path:
    path = Path("/etc/netns", namespace, "resolv.conf")
    path.write_text("".join(f"nameserver {server}\n" for server in nameservers) + "options ndots:5\n")
    return path


def run_istio(invocation: Invocation, namespace: str, workdir: Path) -> Outcome:
    transcript = workdir / "istio-dry-run.txt"
    transcript.unlink(missing_ok=True)  # Istio appends to it
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DRY_RUN_FILE_PATH": str(transcript), **invocation.env}
    argv = ["ip", "netns", "exec", namespace, str(istio_binary("pilot-agent")), "istio-iptables"]
    done = subprocess.run(
        [*argv, *invocation.argv, "--dry-run"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    text = transcript.read_text() if transcript.exists() else ""
    return Outcome(done.returncode == 0, text, done.stderr[-1500:] + done.stdout[-1500:])


def run_ours(invocation: Invocation, namespace: str, resolv_conf: Path) -> Outcome:
    """The CLI's path (`istio_iptables.run` with this env), with the host facts read inside `namespace`."""
    box: dict[str, Outcome] = {}

    def work() -> None:
        enter_netns(Path("/run/netns", namespace))
        out = io.StringIO()
        try:
            args = build_parser().parse_args(["istio-iptables", *invocation.argv, "--dry-run"])
            given_flags = istio_iptables.given_flags(args)
            cfg = build_config(given_flags, invocation.env, HostFacts())
            read_dns = cfg.redirect_dns and not cfg.capture_all_dns
            host = detect_host_facts(cfg.dual_stack, read_dns=read_dns, resolv_conf=resolv_conf)
            code = istio_iptables.execute(given_flags, invocation.env, host, out)
        except AgentError as exc:  # ConfigError included: the one-line message, exit 78
            box["outcome"] = Outcome(False, "", str(exc))
            return
        except SystemExit as exc:  # argparse
            box["outcome"] = Outcome(False, "", f"usage error {exc.code}")
            return
        box["outcome"] = Outcome(code == 0, out.getvalue(), "")

    thread = threading.Thread(target=work, name="ours-in-netns")
    thread.start()
    thread.join()
    return box["outcome"]


def compare(invocation: Invocation, namespaces: dict[str, str], workdir: Path) -> tuple[Outcome, Outcome]:
    namespace = namespaces[invocation.host]
    resolv_conf = _resolv_conf(namespace, invocation.nameservers)
    return run_istio(invocation, namespace, workdir), run_ours(invocation, namespace, resolv_conf)


@differential(default_examples=300)
@given(invocation=valid_invocations())
def test_same_dry_run_transcript_as_istio(
    invocation: Invocation, namespaces: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    istio, ours = compare(invocation, namespaces, tmp_path_factory.getbasetemp())
    assert istio.accepted, f"Istio refused a valid input: {istio.detail}"
    assert ours.accepted, f"we refused what Istio accepts: {ours.detail}"
    assert ours.transcript == istio.transcript


@differential(default_examples=30)
@given(case=rejected_by_both())
def test_inputs_istio_refuses_are_refused_here(
    case: tuple[Invocation, str], namespaces: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    invocation, source = case
    istio, ours = compare(invocation, namespaces, tmp_path_factory.getbasetemp())
    assert not istio.accepted, istio.transcript
    assert not ours.accepted
    assert source in ours.detail


@pytest.mark.parametrize(
    "argv",
    [("-p", "70000"), ("-b", "80,http"), ("-q", "abc"), ("-m", "BOGUS"), ("-u", "istio"), ("-t", "-1"), ("-c", "a/b")],
    ids=["port-out-of-range", "port-name", "port-word", "bad-mode", "uid-name", "negative-mark", "bad-ifname"],
)
def test_invalid_inputs_istio_accepts(
    argv: tuple[str, ...], namespaces: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Deliberate: Istio renders these into rules unchecked (iptables-restore then fails on them, or a mode it does
    not know means REDIRECT); we exit 78 naming the flag at once."""
    istio, ours = compare(Invocation(argv), namespaces, tmp_path_factory.getbasetemp())
    assert istio.accepted, istio.detail
    assert not ours.accepted
    assert f"-{argv[0][-1]}" in ours.detail
