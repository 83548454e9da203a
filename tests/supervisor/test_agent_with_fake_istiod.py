"""End to end: `pilot-agent proxy sidecar` with its default bootstrap, against a control plane behind the agent's
xDS proxy (`<configPath>/XDS` -> discoveryAddress).

tests/support/fake_istiod.py (a fake ADS server, plaintext on loopback: controlPlaneAuthPolicy NONE, file-mounted
certificates, so no CA) stands in for istiod so these tests can script its answers; the agent (a subprocess, as
kubelet runs it), its xDS proxy, the Envoy it starts and the readiness it serves are real. tests/mesh runs the
mesh side against Istio's own istiod.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from agent.proxy.shm import shm_path
from tests.bootstrap.test_default_bootstrap_live import quiet_ports
from tests.supervisor import agent_process
from tests.supervisor.agent_process import ROOT, agent_env
from tests.supervisor.test_agent_e2e import kill_agent
from tests.support.envoy import http_get, new_base_id, wait_until
from tests.support.fake_istiod import CLUSTER, LISTENER, FakeIstiod, broken_listener, demo_listener

pytestmark = pytest.mark.envoy


@dataclass(frozen=True)
class Sidecar:
    proc: subprocess.Popen[bytes]
    istiod: FakeIstiod
    ports: dict[str, int]
    base_id: int
    log: Path

    def ready(self, port_name: str) -> tuple[int, bytes]:
        return http_get(f"http://127.0.0.1:{self.ports[port_name]}/healthz/ready")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextmanager
def running_sidecar(tmp_path: Path, **extra_env: str) -> Iterator[Sidecar]:
    """The agent running `proxy sidecar` (Istio's ports moved to free ones); the fake istiod listening on loopback
    but answering nothing until the test calls `release()`."""
    ports = quiet_ports("admin", "status", "envoy_status", "prom")
    base_id = new_base_id()
    labels = '{"app":"e2e"}'
    log = tmp_path / "agent.log"
    with FakeIstiod("127.0.0.1:0", hold=True) as istiod, log.open("wb") as sink:
        plaintext = {"discoveryAddress": istiod.address, "controlPlaneAuthPolicy": "NONE"}
        proxy_config = json.dumps(agent_process.test_proxy_config(tmp_path, ports, **plaintext))
        env = agent_env(
            tmp_path,
            base_id,
            ports,
            PROXY_CONFIG=proxy_config,
            FILE_MOUNTED_CERTS="true",
            SERVICE_ACCOUNT="e2e-sa",
            ISTIO_METAJSON_LABELS=labels,
            **extra_env,
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "proxy", "sidecar", "--meshConfig", str(tmp_path / "none")],
            env={**env, "PYTHONPATH": str(ROOT)},
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            yield Sidecar(proc, istiod, ports, base_id, log)
        finally:
            kill_agent(proc, base_id)


def wait_envoy_connected(sidecar: Sidecar) -> None:
    """Envoy (started by the agent on its default bootstrap) dialled the XDS pipe and introduced itself to istiod
    through the agent's proxy."""
    wait_until(lambda: sidecar.proc.poll() is not None or sidecar.istiod.nodes != [], timeout=20)
    assert sidecar.proc.poll() is None, sidecar.output()


@pytest.mark.slow
@pytest.mark.parametrize("delta", ["true", "false"])
def test_sidecar_not_ready_until_istiod_answers_then_ready_through_envoy_then_sigterm(
    tmp_path: Path, delta: str
) -> None:
    with running_sidecar(tmp_path, ISTIO_DELTA_XDS=delta) as sidecar:
        istiod = sidecar.istiod
        wait_envoy_connected(sidecar)
        (node,) = istiod.nodes
        assert node.id == "sidecar~127.0.0.1~e2e.test~test.svc.cluster.local"
        assert node.metadata["NAMESPACE"] == "test" and node.metadata["LABELS"] == {"app": "e2e"}
        assert istiod.protocols == ["delta" if delta == "true" else "sotw"]

        # istiod has not answered: the agent's status port says not ready, and why.
        wait_until(lambda: sidecar.ready("status")[0] == 503)
        status, body = sidecar.ready("status")
        assert status == 503
        assert b"config not received from XDS server (is Istiod running?)" in body, body
        info = json.loads(http_get(f"http://127.0.0.1:{sidecar.ports['admin']}/server_info")[1])
        assert info["state"] == "PRE_INITIALIZING"

        istiod.release()
        wait_until(lambda: istiod.acked(CLUSTER) and istiod.acked(LISTENER))
        # Ready as kubelet sees it: through Envoy's status listener, routed to the agent's status port.
        wait_until(lambda: sidecar.ready("envoy_status")[0] == 200, timeout=20)
        assert sidecar.ready("status")[0] == 200

        envoy = [p for p in psutil.Process(sidecar.proc.pid).children() if "envoy" in p.name()]
        assert len(envoy) == 1
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(20) == 0, sidecar.output()
        assert not psutil.pid_exists(envoy[0].pid) or psutil.Process(envoy[0].pid).status() == psutil.STATUS_ZOMBIE
        assert not shm_path(sidecar.base_id).exists()


@pytest.mark.slow
def test_rejected_listeners_keep_the_sidecar_not_ready_until_istiod_fixes_them(tmp_path: Path) -> None:
    port, bad_port = quiet_ports("port", "bad_port").values()
    with running_sidecar(tmp_path) as sidecar:
        istiod = sidecar.istiod
        istiod.set_resources(LISTENER, [broken_listener("bad", bad_port)])
        wait_envoy_connected(sidecar)
        istiod.release()
        wait_until(lambda: istiod.nacks(LISTENER) != [] and istiod.acked(CLUSTER))
        wait_until(lambda: b"rejected" in sidecar.ready("status")[1])
        status, body = sidecar.ready("status")
        assert status == 503
        assert b"config received from XDS server, but was rejected: cds updates: 1 successful" in body, body
        assert b"lds updates: 0 successful, 1 rejected" in body, body

        istiod.set_resources(LISTENER, [demo_listener("demo", port, "fixed")])
        wait_until(lambda: sidecar.ready("envoy_status")[0] == 200, timeout=20)
        assert http_get(f"http://127.0.0.1:{port}/") == (200, b"fixed")


@pytest.mark.slow
def test_envoy_killed_reconnects_to_istiod_and_earns_readiness_again(tmp_path: Path) -> None:
    """The agent restarts a crashed Envoy (Istio's does not): the new Envoy must open a new ADS stream, introduce
    itself again and be re-ACKed before the sidecar is ready again."""
    with running_sidecar(tmp_path) as sidecar:
        istiod = sidecar.istiod
        istiod.release()
        wait_until(lambda: sidecar.ready("envoy_status")[0] == 200, timeout=20)
        (first,) = [p for p in psutil.Process(sidecar.proc.pid).children() if "envoy" in p.name()]
        acks_before = len([r for r in istiod.replies(LISTENER) if r.accepted])

        # The next Envoy finds istiod slow to answer: the sidecar must not be ready on what the dead one knew.
        istiod.hold()
        first.kill()
        wait_until(lambda: len(istiod.protocols) == 2 and len(istiod.nodes) == 2, timeout=20)
        assert istiod.nodes[0] == istiod.nodes[1]
        # (Nothing probed while Envoy was down: the agent must know by itself that this is a new, unconfigured one.)
        wait_until(lambda: b"config not received from XDS server" in sidecar.ready("status")[1], timeout=5)
        assert sidecar.ready("status")[0] == 503

        istiod.release()
        wait_until(lambda: sidecar.ready("envoy_status")[0] == 200, timeout=20)
        assert len([r for r in istiod.replies(LISTENER) if r.accepted]) > acks_before
        assert sidecar.proc.poll() is None, sidecar.output()
