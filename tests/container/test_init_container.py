"""The same image as istio-init (issue 16, item 3): `pilot-agent istio-iptables` from deploy/no-control-plane.yaml,
run by runc in the application's network namespace as root with only NET_ADMIN and NET_RAW (`drop: [ALL]`,
`add: [NET_ADMIN, NET_RAW]`), installs the capture rules with the image's own iptables; without those
capabilities it exits 77 (NOT_PERMITTED) with one line and touches nothing."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from agent.errors import ExitCode
from tests.support.netns import PodNetwork, pod_network
from tests.support.pod import Pod
from tests.support.pod_run import manifest_pod
from tests.support.runc import RuncRuntime

pytestmark = [pytest.mark.container, pytest.mark.root, pytest.mark.netns]

CAP_NET_ADMIN, CAP_NET_RAW = 12, 13


@contextmanager
def init_pod(runtime: RuncRuntime, capabilities: Sequence[str]) -> Iterator[tuple[PodNetwork, Pod]]:
    """The manifest's pod with istio-init's `capabilities.add` replaced (ALL still dropped)."""
    configmap, meta, spec = manifest_pod()
    spec = copy.deepcopy(spec)
    init: dict[str, Any] = next(c for c in spec["initContainers"] if c["name"] == "istio-init")
    assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    init["securityContext"]["capabilities"]["add"] = list(capabilities)
    configmaps = {configmap["metadata"]["name"]: configmap["data"]}
    with pod_network("ini") as net, Pod(meta, spec, netns=net.pod_ns, configmaps=configmaps, runtime=runtime) as pod:
        yield net, pod


def _capabilities(pod: Pod) -> dict[str, int]:
    """The Cap* lines of /proc/self/status of a process started as istio-init is (its user, capabilities)."""
    probe = pod.start("istio-init", argv=["grep", "^Cap", "/proc/self/status"])
    assert probe.wait(timeout=30) == 0, probe.log_text()
    lines = probe.log_text().splitlines()[-5:]
    return {name.rstrip(":"): int(value, 16) for name, value in (line.split() for line in lines)}


def test_istio_init_with_only_net_admin_and_net_raw_installs_the_rules(runtime: RuncRuntime) -> None:
    with init_pod(runtime, ["NET_ADMIN", "NET_RAW"]) as (net, pod):
        code, output = pod.run_to_completion("istio-init")
        assert code == 0, output
        rules = net.iptables_save()
        for rule in (
            "-A PREROUTING -p tcp -j ISTIO_INBOUND",
            "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
            "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        ):
            assert rule in rules, rules
        # And those two capabilities were all it had.
        caps = _capabilities(pod)
    wanted = 1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW
    assert (caps["CapEff"], caps["CapPrm"], caps["CapBnd"], caps["CapAmb"]) == (wanted, wanted, wanted, 0)


def test_istio_init_without_the_capabilities_exits_77_with_one_line(runtime: RuncRuntime) -> None:
    with init_pod(runtime, []) as (net, pod):
        code, output = pod.run_to_completion("istio-init")
        assert _capabilities(pod)["CapEff"] == 0, "root, but no capability at all"
        rules = net.iptables_save()
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == ExitCode.NOT_PERMITTED, output
    assert len(lines) == 1 and "needs CAP_NET_ADMIN" in lines[0], output
    assert "Traceback" not in output
    assert "ISTIO" not in rules
