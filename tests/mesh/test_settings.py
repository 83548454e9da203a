"""From the pod's files and environment to the mesh side's settings: Istio's root, credential and socket rules
(pkg/istio-agent/agent.go FindRootCAForXDS / FindRootCAForCA / GetKeyCertsFor*, Run's socket check)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import NodeOverrides, ProxyFlags, load_agent_config
from agent.errors import ConfigError, ExitCode
from agent.mesh.listen import listen, sds_listener
from agent.mesh.settings import MeshSettings, mesh_settings
from agent.security.uds import SocketError

BASE_ENV = {"POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "reviews", "INSTANCE_IP": "10.0.0.1"}


@pytest.fixture
def pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The agent's cwd: a pod root where ./var/run/secrets/... live (short: sockets are made under it)."""
    root = Path(f"/tmp/meshpod{os.getpid()}-{id(tmp_path) % 100000}")
    root.mkdir()
    monkeypatch.chdir(root)
    yield root
    import shutil  # noqa: PLC0415

    shutil.rmtree(root, ignore_errors=True)


def put(path: str, text: str = "x") -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def settings(env: dict[str, str] | None = None, **flags: str) -> MeshSettings:
    cfg = load_agent_config(
        ProxyFlags(mesh_config="./none", **flags),  # type: ignore[arg-type]
        {**BASE_ENV, **(env or {})},
        NodeOverrides(labels_path="./labels", annotations_path="./annotations"),
    )
    return mesh_settings(cfg)


def test_kubernetes_defaults(pod: Path) -> None:
    put("./var/run/secrets/istio/root-cert.pem")
    mesh = settings({"ISTIO_META_CLUSTER_ID": "Kubernetes", "XDS_HEADER_Tenant": "a", "CA_HEADER_X-Extra": "b"})
    assert mesh.xds is not None
    upstream = mesh.xds.upstream
    assert upstream.address == "istiod.istio-system.svc:15012"
    assert upstream.tls is not None
    assert (upstream.tls.root_cert, upstream.tls.server_name) == (
        "./var/run/secrets/istio/root-cert.pem",
        "istiod.istio-system.svc",
    )
    assert upstream.token_path == "./var/run/secrets/tokens/istio-token"
    assert upstream.headers == (("clusterid", "Kubernetes"), ("tenant", "a"))
    assert mesh.xds.socket_path == "./etc/istio/proxy/XDS"
    assert mesh.ca is not None and mesh.ca.address == upstream.address
    assert mesh.ca.headers == (("clusterid", "Kubernetes"), ("x-extra", "b"))
    assert mesh.cache.identity == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert (mesh.cache.ttl, mesh.cache.grace_ratio, mesh.cache.key_options.rsa_key_size) == (86400, 0.5, 2048)
    assert mesh.sds_socket == "./var/run/secrets/workload-spiffe-uds/socket" and not mesh.custom_sds_socket


def test_missing_istio_root_is_a_start_up_error(pod: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        settings()
    assert raised.value.exit_code == ExitCode.CONFIG_ERROR
    assert "root CA file for XDS: ./var/run/secrets/istio/root-cert.pem: does not exist" in str(raised.value)


def test_xds_root_order(pod: Path) -> None:
    put("./etc/certs/root-cert.pem")
    with pytest.raises(ConfigError, match="root CA file for CA"):  # the CA's root is the ConfigMap's only
        settings()
    mesh = settings({"CA_ROOT_CA": "SYSTEM"})
    assert mesh.xds is not None and mesh.xds.upstream.tls is not None
    assert mesh.xds.upstream.tls.root_cert == "./etc/certs/root-cert.pem"  # before the ConfigMap's
    put("./custom-root.pem")
    custom = settings({"XDS_ROOT_CA": "./custom-root.pem", "CA_ROOT_CA": "SYSTEM"})
    assert custom.xds is not None and custom.xds.upstream.tls is not None
    assert custom.xds.upstream.tls.root_cert == "./custom-root.pem"
    assert custom.ca is not None and custom.ca.tls is not None and custom.ca.tls.root_cert == ""
    with pytest.raises(ConfigError, match=r"env XDS_ROOT_CA: \./missing\.pem: does not exist"):
        settings({"XDS_ROOT_CA": "./missing.pem"})


def test_prov_cert_is_the_client_certificate_of_both(pod: Path) -> None:
    put("./var/run/secrets/istio/root-cert.pem")
    mesh = settings({"PROV_CERT": "./vm", "OUTPUT_CERTS": "./vm"})
    assert mesh.xds is not None and mesh.xds.upstream.tls is not None and mesh.ca is not None
    assert mesh.xds.upstream.tls.root_cert == "./vm/root-cert.pem"  # not checked: written later on a VM
    assert (mesh.xds.upstream.tls.client_cert, mesh.xds.upstream.tls.client_key) == (
        "./vm/cert-chain.pem",
        "./vm/key.pem",
    )
    assert mesh.ca.tls is not None and mesh.ca.tls.client_cert == "./vm/cert-chain.pem"
    assert mesh.cache.output_dir == "./vm" and mesh.cache.output_mode == 0o600
    with pytest.raises(ConfigError, match="mutually exclusive"):
        settings({"PROV_CERT": "./vm", "FILE_MOUNTED_CERTS": "true"})


def test_file_mounted_certificates_use_no_ca(pod: Path) -> None:
    put("./roots/ca.pem")
    meta = {"ISTIO_META_TLS_CLIENT_ROOT_CERT": "./roots/ca.pem", "ISTIO_META_TLS_CLIENT_CERT_CHAIN": "./c.pem"}
    mesh = settings({"FILE_MOUNTED_CERTS": "true", "PROXY_CONFIG": json.dumps({"proxyMetadata": meta})})
    assert mesh.ca is None
    assert mesh.xds is not None and mesh.xds.upstream.tls is not None
    assert mesh.xds.upstream.tls.root_cert == "./roots/ca.pem"
    assert mesh.xds.upstream.tls.client_cert == "./c.pem"


def test_workload_spiffe_credentials_force_file_mounted(pod: Path) -> None:
    put("./var/run/secrets/istio/root-cert.pem")
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        put(f"./var/run/secrets/workload-spiffe-credentials/{name}")
    # File-mounted: istiod's root is XDS_ROOT_CA or proxyMetadata's (Istio does not fall back to the ConfigMap).
    with pytest.raises(ConfigError, match="ISTIO_META_TLS_CLIENT_ROOT_CERT"):
        settings()
    mesh = settings({"XDS_ROOT_CA": "./var/run/secrets/istio/root-cert.pem"})
    assert mesh.ca is None
    assert mesh.cache.cert_chain_file == "./var/run/secrets/workload-spiffe-credentials/cert-chain.pem"


def test_plaintext_control_plane(pod: Path) -> None:
    proxy_config = {"controlPlaneAuthPolicy": "NONE", "discoveryAddress": "localhost:15010"}
    mesh = settings({"PROXY_CONFIG": json.dumps(proxy_config)})
    assert mesh.xds is not None and mesh.xds.upstream.tls is None
    assert mesh.ca is not None and mesh.ca.tls is None  # :15010 is istiod's plaintext port


def test_local_xds_means_no_proxy(pod: Path) -> None:
    put("./var/run/secrets/istio/root-cert.pem")
    xds = pod / "xds"
    xds.mkdir()
    (xds / "lds.yaml").write_text("resources: []\n")
    (xds / "cds.yaml").write_text("resources: []\n")
    assert settings(local_xds_dir=str(xds)).xds is None


def test_socket_file_must_be_a_name(pod: Path) -> None:
    put("./var/run/secrets/istio/root-cert.pem")
    with pytest.raises(ConfigError, match="must be a file name"):
        settings({"WORKLOAD_IDENTITY_SOCKET_FILE": "../elsewhere"})


# -- the socket check before Envoy starts ----------------------------------------------------------------------


async def test_sockets_listen_and_an_unhealthy_sds_socket_is_replaced(pod: Path) -> None:
    put("./var/run/secrets/istio/root-cert.pem")
    mesh = settings()
    dead = socket.socket(socket.AF_UNIX)
    Path(mesh.sds_socket).parent.mkdir(parents=True)
    dead.bind(mesh.sds_socket)  # a socket file nobody listens on: a crashed provider's leftover
    dead.close()
    listeners = await listen(mesh)
    try:
        assert not listeners.serve_only_files and listeners.sds.path == mesh.sds_socket
        assert listeners.xds is not None and os.stat(listeners.xds.path).st_mode & 0o777 == 0o666
    finally:
        await listeners.stop()


async def test_a_healthy_sds_socket_of_another_provider_is_left_alone(pod: Path) -> None:
    put("./var/run/secrets/istio/root-cert.pem")
    mesh = settings()
    spire = sds_listener(mesh.sds_socket)  # any gRPC server there counts as healthy
    await spire.start()
    listeners = await listen(mesh)
    try:
        assert listeners.serve_only_files
        assert listeners.sds.path == "./var/run/secrets/credential-uds/files-socket"
    finally:
        await listeners.stop()
        await spire.stop()


async def test_a_custom_socket_name_without_a_socket_is_an_error(pod: Path) -> None:
    put("./var/run/secrets/istio/root-cert.pem")
    mesh = settings({"WORKLOAD_IDENTITY_SOCKET_FILE": "spire.sock"})
    with pytest.raises(SocketError, match="non-default SDS socket path") as raised:
        await listen(mesh)
    assert raised.value.exit_code == ExitCode.STARTUP_FAILED
