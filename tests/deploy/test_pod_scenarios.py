"""The sidecar's hard moments, in the pod harness, with the real agent and Envoy and no control plane
(deploy/no-control-plane.yaml, run by tests/support/pod_run.py the way kubelet runs it):

- certificates rotate the way kubelet updates a Secret volume (the `..data` swap) under a steady client load: the
  agent hot-restarts Envoy into a new epoch and no request fails;
- Envoy is SIGKILLed: 15021 fails until the agent has Envoy back, then passes; while no Envoy listens a captured
  connection is refused, never accepted and then dropped;
- the pod is deleted while slow requests are in flight: they complete with 200, the agent exits 0 inside the grace
  period, nothing is left in the PID namespace.

Requests served/failed are printed (`pytest -s`); timings are measured by bench/bench_pod.py, not asserted here.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support.envoy import wait_until
from tests.support.pod import Pod
from tests.support.pod_run import (
    CERT_SECRET,
    Outcome,
    get_once,
    http_text_or_none,
    in_netns,
    no_control_plane_pod,
    self_signed,
    summary,
)
from tests.support.probes import enter_netns

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.envoy, pytest.mark.slow]

CERTS = "/etc/certs"
CERT_FILES = ("cert-chain.pem", "key.pem", "root-cert.pem")


def _cert_env(pod: Pod) -> dict[str, str]:
    """The agent watches /etc/certs/*.pem; here the volume is under the pod root, not the host's /etc, so the
    ISTIO_META_TLS_* overrides (also watched, bootstrap_dependencies) name the same files where they really are."""
    return {
        "ISTIO_META_TLS_CLIENT_CERT_CHAIN": str(pod.path(CERTS) / "cert-chain.pem"),
        "ISTIO_META_TLS_CLIENT_KEY": str(pod.path(CERTS) / "key.pem"),
        "ISTIO_META_TLS_CLIENT_ROOT_CERT": str(pod.path(CERTS) / "root-cert.pem"),
    }


def test_cert_rotation_by_secret_volume_swap_hot_restarts_envoy_and_no_request_fails(tmp_path: Path) -> None:
    require_root()
    first, second = self_signed("echo", tmp_path), self_signed("echo-rotated", tmp_path)
    with no_control_plane_pod("rot", secrets={CERT_SECRET: first}, env=_cert_env) as run:
        assert run.envoy_epoch() == (0, "LIVE")
        assert run.agent_metric("istio_agent_envoy_epoch") == 0
        envoys_before = run.proxy.named("envoy")
        with run.load(threads=4, timeout=5) as load:
            wait_until(lambda: len(load.snapshot()) >= 20, timeout=10)
            rotated_at = time.monotonic()
            # kubelet's update of the Secret volume: a new timestamped directory, ..data renamed onto it.
            run.pod.update_secret(CERT_SECRET, second)
            assert (run.pod.path(CERTS) / "cert-chain.pem").read_bytes() == second["cert-chain.pem"]
            wait_until(lambda: run.envoy_epoch() == (1, "LIVE"), timeout=20)
            live_at = time.monotonic()
            wait_until(lambda: run.ready()[0] == 200, timeout=10)
            # Keep the load on while the old epoch drains and after the new one took the listeners over.
            count = len(load.snapshot())
            wait_until(lambda: len(load.snapshot()) >= count + 50, timeout=10)
        outcomes = load.outcomes
        assert run.agent_metric("istio_agent_envoy_epoch") == 1
        # Counted once the agent has seen epoch 1 LIVE itself (its own poll, up to 250 ms apart, and the check that
        # the answer is epoch 1's own): it may come after this test saw 15000 answer epoch 1.
        done = 'istio_agent_hot_restarts_total{outcome="done"}'
        wait_until(lambda: run.agent_metric(done) == 1, timeout=10)
        assert run.agent_metric('istio_agent_file_changes_total{kind="cert"}') == 3
        envoys_after = run.proxy.named("envoy")
        assert len(envoys_after) == 2 and set(envoys_before) < set(envoys_after), "epoch 0 drains beside epoch 1"
        failures = [o for o in outcomes if not o.ok]
        print(f"rotation: {summary(outcomes)}; hot restart took {live_at - rotated_at:.2f}s from the ..data swap")
        assert not failures, f"{summary(outcomes)}: {failures[:5]}"
        assert any(o.started < rotated_at for o in outcomes) and any(o.started > live_at for o in outcomes)
        log = run.proxy.log_text()
        assert "hot restart: starting Envoy epoch 1" in log
        assert "cert-chain.pem changed" in log


def _dead(pid: int) -> bool:
    """Reaped by the agent. Not merely a zombie: the leader of a thread group is a zombie while its other threads
    still exit, and the sockets (shared by the threads) close only when the last one has."""
    return not Path(f"/proc/{pid}").exists()


def test_envoy_killed_readiness_fails_until_it_is_back_and_no_connection_is_accepted_then_lost() -> None:
    require_root()
    with no_control_plane_pod("kill") as run:
        [envoy] = run.proxy.named("envoy")
        assert run.request().ok
        ready_url = f"http://{run.net.pod_ip}:15021/healthz/ready"
        readiness: list[tuple[float, int | None]] = []
        done = threading.Event()

        def probe_readiness() -> None:
            # kubelet's readiness probe, every 10 ms instead of every 15 s, so the outage cannot fall between two.
            enter_netns(run.client_ns)
            while not done.is_set():
                status = http_text_or_none(ready_url)
                readiness.append((time.monotonic(), status))
                time.sleep(0.01)

        # The kill comes first, with no request in flight, and the load starts once the process is gone: until its
        # last thread has exited its listen sockets still complete handshakes, and those connections are reset
        # (the kernel's doing, whoever supervises Envoy). What is checked is the time with no Envoy.
        killed_at = time.monotonic()
        os.kill(envoy, signal.SIGKILL)
        wait_until(lambda: _dead(envoy), timeout=10, interval=0.001)
        prober = threading.Thread(target=probe_readiness, daemon=True)
        prober.start()
        try:
            with run.load(threads=2, timeout=5) as load:

                def back() -> bool:
                    passed = [t for t, status in readiness if status == 200]
                    return bool(passed) and sum(1 for o in load.snapshot() if o.ok and o.started > passed[0]) >= 20

                wait_until(back, timeout=30)
        finally:
            done.set()
            prober.join(timeout=10)
        outcomes = load.outcomes
        ready_again = next(t for t, status in readiness if status == 200)
        failed_probes = [t for t, status in readiness if status != 200 and t < ready_again]
        print(
            f"envoy killed: ready again after {ready_again - killed_at:.2f}s "
            f"({len(failed_probes)} failed probes first); requests {summary(outcomes)}"
        )
        assert failed_probes, "15021 failed while Envoy was gone"
        assert all(status == 200 for t, status in readiness if t > ready_again), "ready stays ready once back"
        lost = [o for o in outcomes if o.lost]
        assert not lost, f"connections accepted and then dropped: {lost[:5]}"
        assert {o.error for o in outcomes if not o.ok} <= {"ECONNREFUSED"}, summary(outcomes)
        assert any(o.error == "ECONNREFUSED" for o in outcomes), "no Envoy listened for a while: refused"
        refused_after_ready = [o for o in outcomes if o.started > ready_again and not o.ok]
        assert not refused_after_ready, f"15021 passed before Envoy served: {refused_after_ready[:5]}"
        # The same agent (PID 1 never restarted), a new Envoy, counted as an exit the agent did not ask for.
        assert run.proxy.running()
        assert run.proxy.named("envoy") not in ([], [envoy])
        assert (run.agent_metric('istio_agent_envoy_exits_total{cause="oom"}') or 0) >= 1


def test_pod_deleted_with_slow_requests_in_flight_they_complete_and_the_agent_exits_0() -> None:
    require_root()
    in_flight = 8
    drain = {"proxy.istio.io/config": "terminationDrainDuration: 2s\n"}
    with no_control_plane_pod("del", annotations=drain) as run:
        with ThreadPoolExecutor(in_flight, initializer=enter_netns, initargs=(run.client_ns,)) as pool:
            futures = [pool.submit(get_once, run.net.pod_ip, 8080, "/sleep/1000", 10.0) for _ in range(in_flight)]
            # All of them inside the app (Envoy's upstream connections to 8080) before the deletion starts.
            wait_until(lambda: run.connections_to(8080) == in_flight, timeout=5)
            deletion_started = time.monotonic()
            termination = run.pod.delete()["istio-proxy"]
            outcomes: list[Outcome] = [f.result() for f in futures]
        print(f"deletion: {summary(outcomes)}; agent exit {termination.exit_code} after {termination.seconds:.2f}s")
        assert [o.status for o in outcomes] == [200] * in_flight, outcomes
        assert all(o.ended > deletion_started for o in outcomes), "they were in flight when the deletion began"
        assert termination.exit_code == 0, run.proxy.log_text()[-4000:]
        assert not termination.killed
        assert termination.seconds < run.pod.termination_grace_s()
        assert run.proxy.processes() == [], "nothing is left in the PID namespace"


def test_after_a_crash_the_agents_own_readiness_waits_for_the_new_envoy() -> None:
    """The agent's /healthz/ready (15020, what Envoy's 15021 listener forwards to, and what `pilot-agent wait`
    and other local checks read) must not pass before the restarted Envoy serves, even when nobody probed while
    Envoy was down (kubelet probes every 15 s; an outage is ~0.3 s)."""
    require_root()
    with no_control_plane_pod("rdy") as run:
        [envoy] = run.proxy.named("envoy")
        os.kill(envoy, signal.SIGKILL)
        # No probe during the outage: wait, without asking the agent anything, for the agent's new Envoy process.
        wait_until(lambda: [p for p in run.proxy.named("envoy") if p != envoy], timeout=10, interval=0.001)

        def ready_then_request() -> tuple[int | None, Outcome]:
            status = http_text_or_none(f"http://{run.net.pod_ip}:15020/healthz/ready")
            return status, get_once(run.net.pod_ip, 8080)

        status, outcome = in_netns(run.client_ns, ready_then_request)
        assert status != 200 or outcome.ok, f"15020 said ready ({status}) while a request got {outcome.error}"


def test_startup_duration_metric_is_not_longer_than_the_container_has_existed() -> None:
    """istio_agent_startup_duration_seconds (agent start -> first ready) cannot exceed the time from the harness
    starting the container to 15021 passing: the agent's process starts after the first and was ready by the
    second."""
    require_root()
    with no_control_plane_pod("sud") as run:
        reported = run.agent_metric("istio_agent_startup_duration_seconds")
        measured = run.ready_at - run.proxy_started
        print(f"startup duration: agent reports {reported}s, container start -> 15021 ready took {measured:.3f}s")
        assert reported is not None and 0 < reported <= measured + 0.02
