"""The status server on Istio's fixed port 15020 inside a pod network namespace: peers that really are remote,
and `pilot-agent request` exactly as the native-sidecar preStop hook runs it."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import require_root
from tests.support.envoy import wait_until
from tests.support.netns import pod_network

pytestmark = [pytest.mark.root, pytest.mark.netns]


def test_status_port_in_a_pod() -> None:
    require_root()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "METRICS_LOCALHOST_ACCESS_ONLY": "true"}
    with pod_network("st") as pod:
        server = pod.popen([sys.executable, "-m", "tests.status.pod_status_server"], env=env, log_name="status.log")
        try:
            wait_until(lambda: "ready" in server.log(), timeout=20)
            url = f"http://{pod.pod_ip}:15020"
            # From the client namespace (10.10.0.1): readiness is open, the rest is loopback only.
            ready = pod.http_get(f"{url}/healthz/ready")
            assert (ready.status, ready.body) == (503, "Envoy has not been started yet\n")
            for path in ("/quitquitquit", "/drain", "/stats/prometheus"):
                refused = pod.http_get(url + path)
                assert (refused.status, refused.body) == (403, "Only requests from localhost are allowed"), path
            # Inside the pod, as kubelet's hooks run it.
            probe = pod.pilot_agent("request", "--debug-port", "15020", "GET", "healthz/ready")
            assert probe.returncode == 5 and probe.stdout == "Envoy has not been started yet\n\n"
            metrics = pod.pilot_agent("request", "--debug-port=15020", "GET", "/stats/prometheus")
            assert metrics.returncode == 0 and "istio_agent_scrapes_total 1" in metrics.stdout
            drain = pod.pilot_agent("request", "--debug-port=15020", "POST", "drain")
            assert drain.returncode == 5  # no Envoy admin on 15000 here: the drain is reported as failed
            assert drain.stdout.startswith("drain failed: ")
            quit_ = pod.pilot_agent("request", "--debug-port=15020", "POST", "quitquitquit")
            assert (quit_.returncode, quit_.stdout) == (0, "OK\n")
            server.popen.wait(10)
            assert "shutdown: /quitquitquit called skip_drain=True" in server.log()
        finally:
            server.stop()
