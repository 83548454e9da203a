"""The image as istio-proxy under runc (issue 16, item 2): deploy/no-control-plane.yaml's pod with its istio-init and
istio-proxy containers started from the built image by runc, the way a kubelet with containerd would start them.

The agent is PID 1 of the container's PID namespace, uid 1337 with no capabilities, on a read-only root, in the pod's
network namespace (joined to the "node" namespace by a veth), with the injector's mounts from the manifest: the
downward-API pod-info files on /etc/istio/pod, a writable emptyDir on /etc/istio/proxy, the local xDS ConfigMap on
/etc/istio/local-xds. Only the app is the harness's (agnhost's stand-in, a host process in the pod namespace).
"""

from __future__ import annotations

import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.errors import ExitCode
from tests.support.envoy import wait_until
from tests.support.netns import pod_network
from tests.support.pod import Pod
from tests.support.pod_run import RunningPod, get_once, http_text, in_netns, manifest_pod, no_control_plane_pod
from tests.support.probes import enter_netns
from tests.support.runc import RuncContainer, RuncRuntime

pytestmark = [pytest.mark.container, pytest.mark.root, pytest.mark.netns, pytest.mark.envoy, pytest.mark.slow]

DRAIN_S = 2.0
DRAIN = {"proxy.istio.io/config": f"terminationDrainDuration: {DRAIN_S:g}s\n"}


def _reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _to_the_app(run: RunningPod, path: str) -> str:
    """A request straight to the app from inside the pod (127.0.0.1: not captured, Envoy not involved)."""
    status, body = in_netns(run.pod_ns, lambda: http_text(f"http://127.0.0.1:8080{path}"))
    assert status == 200, body
    return body


def test_sidecar_serves_through_envoy_and_runc_kill_drains_it_to_exit_0(runtime: RuncRuntime) -> None:
    with no_control_plane_pod("img", annotations=DRAIN, runtime=runtime) as run:
        proxy = run.proxy
        assert isinstance(proxy, RuncContainer)
        # Ready from outside: kubelet's probe to podIP:15021 across the veth (no_control_plane_pod waited for it).
        assert run.ready()[0] == 200
        # The agent is PID 1, uid 1337; its Envoy runs under it as 1337 (what istio-init exempts from capture).
        assert proxy.pid1 is not None
        assert proxy.pid_in_namespace(proxy.pid1) == 1
        assert b"pilot-agent" in Path(f"/proc/{proxy.pid1}/cmdline").read_bytes()
        assert proxy.uid_of(proxy.pid1) == 1337
        [envoy] = proxy.named("envoy")
        assert proxy.uid_of(envoy) == 1337
        # Read-only root; the agent wrote Envoy's bootstrap into the writable /etc/istio/proxy volume.
        touched = proxy.exec(["touch", "/etc/written-at-run-time"], timeout=10)
        assert touched.returncode != 0 and b"Read-only file system" in touched.stderr
        assert list(run.pod.path("/etc/istio/proxy").glob("envoy-rev*.json"))
        # A client's request to the app is captured (istio-init's rules, from the image) into Envoy's listener.
        reply = run.request("/hello")
        assert reply.status == 200, reply

        # Deletion with requests in flight: `runc kill <id> TERM`, the agent drains for terminationDrainDuration,
        # the requests complete, and the container's exit code is 0. The app holds both requests until the drain
        # has begun. (Not "two connections to 8080": Envoy pools its upstream connections per worker, so the
        # earlier request's idle one could make it three.)
        with (
            ThreadPoolExecutor(2, initializer=enter_netns, initargs=(run.client_ns,)) as clients,
            ThreadPoolExecutor(1) as kubelet,
        ):
            held = [clients.submit(get_once, run.net.pod_ip, 8080, "/hold", DRAIN_S + 10) for _ in range(2)]
            wait_until(lambda: _to_the_app(run, "/held") == "2", timeout=30)
            deletion = kubelet.submit(run.pod.delete, grace_s=DRAIN_S + 10)
            wait_until(lambda: "Graceful termination period is" in proxy.log_text(), timeout=30)
            _to_the_app(run, "/release")
            outcomes = [f.result() for f in held]
            termination = deletion.result()["istio-proxy"]
        assert [o.status for o in outcomes] == [200, 200], outcomes
        assert termination.exit_code == 0, proxy.log_text()[-3000:]
        assert not termination.killed
        assert DRAIN_S <= termination.seconds < DRAIN_S + 5, termination
        assert re.search(rf"Graceful termination period is {DRAIN_S:g}s", proxy.log_text())
        assert proxy.processes() == [], "nothing is left in the container's PID namespace"


def test_envoy_killed_inside_is_restarted_and_orphans_are_reaped(runtime: RuncRuntime) -> None:
    with no_control_plane_pod("imk", annotations=DRAIN, runtime=runtime) as run:
        proxy = run.proxy
        [envoy] = proxy.named("envoy")
        os.kill(envoy, signal.SIGKILL)
        wait_until(lambda: [p for p in proxy.named("envoy") if p != envoy], timeout=15)
        wait_until(lambda: run.ready()[0] == 200, timeout=15)
        assert run.request().status == 200
        assert proxy.running()
        assert _reaped(envoy)

        # An orphan: a process started by `kubectl exec` whose parent exits is re-parented to the container's PID 1.
        started = proxy.exec(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo started"], timeout=10)
        assert started.returncode == 0, started.stderr
        [orphan] = proxy.named("sleep")
        assert _parent(orphan) == proxy.pid1
        os.kill(orphan, signal.SIGKILL)
        wait_until(lambda: _reaped(orphan), timeout=10)
        assert proxy.running()


def test_the_agents_exit_code_is_the_containers(runtime: RuncRuntime) -> None:
    """A bad PROXY_CONFIG: the agent exits CONFIG_ERROR with one line naming it, and so does the container."""
    configmap, meta, spec = manifest_pod()
    configmaps = {configmap["metadata"]["name"]: configmap["data"]}
    with pod_network("imx") as net, Pod(meta, spec, netns=net.pod_ns, configmaps=configmaps, runtime=runtime) as pod:
        proxy = pod.start("istio-proxy", env_overrides={"PROXY_CONFIG": "drainDuration: [\n"})
        code = proxy.wait(timeout=30)
        lines = [line for line in proxy.log_text().splitlines() if line.strip()]
    assert code == ExitCode.CONFIG_ERROR, lines
    assert len(lines) == 1 and "PROXY_CONFIG" in lines[0], lines
