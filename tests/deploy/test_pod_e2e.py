"""deploy/no-control-plane.yaml, run the way kubelet runs it, on this machine: the manifest works, end to end.

A pod network namespace joined to a "node/client" namespace by a veth (tests/support/netns.py); the manifest's
istio-init container run to completion (real iptables); the app (the netns harness's HTTP app standing in for the
agnhost image); the manifest's istio-proxy container as PID 1 of its own PID namespace, uid 1337, with kubelet's
downward-API and ConfigMap volumes; kubelet's startup and readiness probes from the node side; a client request
captured into Envoy; then pod deletion: SIGTERM, the agent drains and exits 0 within the grace period, and nothing
is left in the PID namespace. And a bad annotation, delivered as kubelet delivers annotation changes, is refused
while Envoy keeps serving.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support.envoy import wait_until
from tests.support.kube_values import PodIdentity
from tests.support.netns import pod_network
from tests.support.pod import Pod, load_documents, pod_template
from tests.support.pod_run import manifest_pod

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.envoy, pytest.mark.slow]


DRAIN_S = 2.0


def _hook(variant: str, container: str, hook: str) -> list[str]:
    _meta, spec = pod_template(next(d for d in load_documents(DEPLOY / f"{variant}.yaml") if d["kind"] == "Deployment"))
    found = next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == container)
    return [str(part) for part in found["lifecycle"][hook]["exec"]["command"]]


@pytest.mark.parametrize("deletion", ["sidecar", "native-sidecar"])
def test_no_control_plane_pod_starts_serves_through_envoy_and_stops_cleanly(deletion: str) -> None:
    require_root()
    configmap, meta, spec = manifest_pod()
    with pod_network("dep") as net:
        identity = PodIdentity(
            name="echo-local-5d8f7b6c4-x7k2p",
            labels={**meta["labels"], "pod-template-hash": "5d8f7b6c4"},
            # Per-pod ProxyConfig through the annotation, as an operator would: a short drain keeps the test short.
            annotations={**meta["annotations"], "proxy.istio.io/config": f"terminationDrainDuration: {DRAIN_S:g}s\n"},
            service_account="echo",
            pod_ip=net.pod_ip,
            host_ip=net.client_ip,
            node_cpus=2,
        )
        with Pod(
            meta,
            spec,
            identity=identity,
            netns=net.pod_ns,
            configmaps={configmap["metadata"]["name"]: configmap["data"]},
        ) as pod:
            # 1. istio-init, to completion, before anything else.
            code, output = pod.run_to_completion("istio-init")
            assert code == 0, output
            assert "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" in net.iptables_save()

            with net.app([8080]):
                # 2. istio-proxy: the manifest's args and env; only the absolute ConfigMap path is mapped here.
                started = time.monotonic()
                proxy = pod.start(
                    "istio-proxy", env_overrides={"ISTIO_LOCAL_XDS_DIR": str(pod.path("/etc/istio/local-xds"))}
                )
                # 3. kubelet's probes, from the node side of the veth, on the manifest's periods and thresholds.
                with pod.probes("istio-proxy", netns=net.client_ns) as probes:
                    assert probes.wait_for(lambda p: p.ready, timeout=60), proxy.log_text()[-4000:]
                    ready_after = time.monotonic() - started
                    assert probes.started
                    # The agent is the container's PID 1; Envoy runs under it as 1337 (what capture exempts).
                    assert proxy.pid1 is not None
                    assert proxy.pid_in_namespace(proxy.pid1) == 1
                    assert b"pilot-agent" in Path(f"/proc/{proxy.pid1}/cmdline").read_bytes()
                    envoys = proxy.named("envoy")
                    assert len(envoys) == 1
                    assert proxy.uid_of(envoys[0]) == 1337
                    assert proxy.uid_of(proxy.pid1) == 1337

                    # 4. A client reaches the app on its own port: captured to 15006, Envoy, then 127.0.0.1:8080.
                    reply = net.http_get(f"http://{net.pod_ip}:8080/hello")
                    assert reply.status == 200
                    assert "local=127.0.0.1:8080" in reply.body, "the app saw Envoy's connection, not the client's"
                    assert reply.headers.get("server") == "envoy"

                    # 5. The ConfigMap is edited: kubelet swaps the volume's ..data link, Envoy (watched_directory)
                    # reloads the listeners, no restart.
                    lds = re.sub(
                        r'(?m)^( *)domains: \["\*"\]$',
                        lambda m: (
                            f"{m.group(0)}\n{m.group(1)}response_headers_to_add:\n"
                            f'{m.group(1)}- header: {{key: x-config-version, value: "2"}}'
                        ),
                        configmap["data"]["lds.yaml"],
                        count=1,
                    )
                    assert "x-config-version" in lds
                    pod.update_configmap(configmap["metadata"]["name"], {**configmap["data"], "lds.yaml": lds})
                    wait_until(
                        lambda: net.http_get(f"http://{net.pod_ip}:8080/").headers.get("x-config-version") == "2",
                        timeout=20,
                    )
                    assert probes.ready
                    assert proxy.running()

                # The app's rewritten readiness probe: kubelet -> agent :15020 -> app :8080.
                with pod.probes("app", netns=net.client_ns) as app_probes:
                    assert app_probes.wait_for(lambda p: p.ready, timeout=20)

                # 6. holdApplicationUntilProxyStarts' postStart hook, from its manifest, inside this container.
                waited = proxy.exec(_hook("hold-application", "istio-proxy", "postStart"), timeout=70)
                assert waited.returncode == 0, waited.stderr.decode()

                # 7. Pod deletion. Classic sidecar: SIGTERM, the agent drains for terminationDrainDuration (from the
                # annotation), exits 0. Native sidecar: the preStop hook from native-sidecar.yaml drains first, so
                # the SIGTERM that follows stops Envoy at once.
                if deletion == "sidecar":
                    termination = pod.delete()["istio-proxy"]
                else:
                    pre_stop = _hook("native-sidecar", "istio-proxy", "preStop")
                    termination = proxy.terminate(pod.termination_grace_s(), pre_stop=pre_stop)
            assert termination.exit_code == 0, proxy.log_text()[-4000:]
            assert not termination.killed
            assert termination.seconds < pod.termination_grace_s()
            if deletion == "sidecar":
                assert termination.seconds >= DRAIN_S, "Envoy is given the drain period"
            else:
                # Measured from the SIGTERM: the preStop hook's own run (a Python CLI start, seconds on a loaded
                # machine) is not the agent waiting. And the agent's own account of it: no second drain period.
                assert termination.after_sigterm < DRAIN_S, "after /drain, SIGTERM does not wait again"
                log = proxy.log_text()
                assert "drain requested: listeners draining" in log, log[-3000:]
                assert "shutdown without drain (received signal: SIGTERM)" in log, log[-3000:]
                assert "Graceful termination period is" not in log, log[-3000:]
            assert proxy.processes() == [], "Envoy and every other process died with the agent"
    # Reported, not asserted: timing goals belong in benchmarks.
    print(f"{deletion}: istio-proxy start -> kubelet Ready {ready_after:.2f}s, termination {termination.seconds:.2f}s")


def test_a_bad_annotation_is_refused_while_the_running_envoy_keeps_serving() -> None:
    """The pod's proxy.istio.io/config annotation is edited into something that cannot render: kubelet rewrites the
    downward-API file (..data swap), the agent sees it, refuses it (log, istio_agent_config_errors), and the Envoy
    that is running keeps serving and stays ready."""
    require_root()
    configmap, meta, spec = manifest_pod()
    with pod_network("dep") as net:
        identity = PodIdentity(
            labels=dict(meta["labels"]), annotations=dict(meta["annotations"]), pod_ip=net.pod_ip, host_ip=net.client_ip
        )
        configmaps = {configmap["metadata"]["name"]: configmap["data"]}
        with Pod(meta, spec, identity=identity, netns=net.pod_ns, configmaps=configmaps) as pod:
            assert pod.run_to_completion("istio-init")[0] == 0
            with net.app([8080]):
                proxy = pod.start(
                    "istio-proxy", env_overrides={"ISTIO_LOCAL_XDS_DIR": str(pod.path("/etc/istio/local-xds"))}
                )
                with pod.probes("istio-proxy", netns=net.client_ns) as probes:
                    assert probes.wait_for(lambda p: p.ready, timeout=60), proxy.log_text()[-4000:]
                    envoys = proxy.named("envoy")
                    assert net.http_get(f"http://{net.pod_ip}:8080/").status == 200

                    bad = {**identity.annotations, "proxy.istio.io/config": "concurrency: [not, a, number]\n"}
                    pod.update_metadata(annotations=bad)

                    def refused() -> bool:
                        metrics = net.http_get(f"http://{net.pod_ip}:15020/stats/prometheus").body
                        return any(
                            line.startswith("istio_agent_config_errors_total") and not line.rstrip().endswith(" 0")
                            for line in metrics.splitlines()
                        )

                    wait_until(refused, timeout=20)
                    errors = [ln for ln in proxy.log_text().splitlines() if "\terror\t" in ln]
                    assert any("annotations" in ln and "proxy.istio.io/config" in ln for ln in errors), errors
                    # Still the same Envoy, still serving, still ready.
                    assert proxy.named("envoy") == envoys
                    assert net.http_get(f"http://{net.pod_ip}:8080/").status == 200
                    assert probes.ready
                termination = pod.delete(grace_s=10)["istio-proxy"]
            assert termination.exit_code == 0, proxy.log_text()[-4000:]
