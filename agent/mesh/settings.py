"""AgentConfig -> the mesh side's frozen settings, in one place (Istio's pilot-agent options/security.go,
options/agent.go and istio-agent/agent.go: FindRootCAForXDS, FindRootCAForCA, GetKeyCertsFor*, initSdsServer).

Facts read from files here (once, at start): which root files exist, whether workload-spiffe-credentials are
mounted. The roots themselves are read again at every connection (agent.security.credentials).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.config import env_settings as E
from agent.config.agent_config import AgentConfig
from agent.config.envvars import Environment, EnvPrefix, EnvVar
from agent.errors import ConfigError
from agent.security.settings import (
    KeyOptions,
    SecretCacheSettings,
    TlsSettings,
    UpstreamSettings,
    os_root_file,
    server_name,
    spiffe_id,
)
from agent.xds.settings import XdsProxySettings

log = logging.getLogger("agent.mesh")

# Istio's well-known paths (pkg/security/security.go, pkg/istio-agent/agent.go), relative to the agent's cwd.
CERT_DIR = "./etc/certs"  # DefaultCertChainFilePath & co. (mounted certificates, VM provisioning)
ISTIO_CA_ROOT = "./var/run/secrets/istio/root-cert.pem"  # the istio-ca-root-cert ConfigMap
TOKEN_PATH = "./var/run/secrets/tokens/istio-token"  # the projected service-account token (audience istio-ca)
SDS_SOCKET_DIR = "./var/run/secrets/workload-spiffe-uds"
FILES_SOCKET = "./var/run/secrets/credential-uds/files-socket"  # SDS for files when another provider owns the socket
WORKLOAD_CREDENTIALS = "./var/run/secrets/workload-spiffe-credentials"
SYSTEM = "SYSTEM"
ISTIO_SOCKET_FILE = "socket"


@dataclass(frozen=True)
class MeshSettings:
    """`xds` is None when Envoy takes its config from files (--local-xds-dir): no proxy then. `ca` is None when
    certificates are file-mounted (no CSR is ever sent)."""

    xds: XdsProxySettings | None
    sds_socket: str
    custom_sds_socket: bool  # WORKLOAD_IDENTITY_SOCKET_FILE names another provider's socket
    cache: SecretCacheSettings
    ca: UpstreamSettings | None
    cert_signer: str


def _headers(env: Environment, cluster_id: str, family: EnvPrefix) -> tuple[tuple[str, str], ...]:
    # gRPC metadata keys are lower-case on the wire (Go lower-cases them; Python's grpc insists).
    pairs = [("clusterid", cluster_id)]
    pairs += [(name[len(family.prefix) :].lower(), value) for name, value in env.with_prefix(family)]
    return tuple(pairs)


def _exists(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # a name too long, say: as good as missing (Path.is_file raises for it)
        return False


def _required(path: str, what: str) -> str:
    """Istio fails at start when the root it settled on is missing: an obscure TLS error later is worse."""
    if not _exists(path):
        raise ConfigError(what, path, "does not exist")
    return path


def _configured_root(env: Environment, setting: EnvVar[str]) -> str | None:
    """XDS_ROOT_CA / CA_ROOT_CA: "" for the system's roots, a file that must exist, or None when unset."""
    configured = env[setting]
    if configured == SYSTEM:
        return ""
    return _required(configured, setting.source) if configured else None


def xds_root(cfg: AgentConfig, file_mounted: bool) -> str:
    """Istio's FindRootCAForXDS: the root istiod's certificate must chain to ("" = the system's roots)."""
    env = cfg.env
    if (configured := _configured_root(env, E.XDS_ROOT_CA)) is not None:
        return configured
    if _exists(f"{CERT_DIR}/root-cert.pem"):
        return f"{CERT_DIR}/root-cert.pem"
    if env[E.PROV_CERT]:
        return f"{env[E.PROV_CERT]}/root-cert.pem"  # not checked: a VM may get it later (Istio)
    if file_mounted:
        path = cfg.proxy.proxy_metadata.get("ISTIO_META_TLS_CLIENT_ROOT_CERT", "")
        return _required(path, "ProxyConfig proxyMetadata ISTIO_META_TLS_CLIENT_ROOT_CERT (root CA for XDS)")
    if env[E.PILOT_CERT_PROVIDER] == "none":
        raise ConfigError(E.PILOT_CERT_PROVIDER.source, "", "root CA file for XDS required but provider is none")
    return _required(ISTIO_CA_ROOT, "root CA file for XDS")


def ca_root(cfg: AgentConfig) -> str:
    """Istio's FindRootCAForCA."""
    env = cfg.env
    if (configured := _configured_root(env, E.CA_ROOT_CA)) is not None:
        return configured
    if env[E.PILOT_CERT_PROVIDER] == "custom":
        return _required(f"{CERT_DIR}/root-cert.pem", "root CA file for CA (PILOT_CERT_PROVIDER=custom)")
    if env[E.PROV_CERT]:
        return f"{env[E.PROV_CERT]}/root-cert.pem"
    if env[E.PILOT_CERT_PROVIDER] == "none":
        raise ConfigError(E.PILOT_CERT_PROVIDER.source, "", "root CA file for CA required but provider is none")
    return _required(ISTIO_CA_ROOT, "root CA file for CA")


def _client_pair(cfg: AgentConfig, file_mounted: bool) -> tuple[str, str]:
    """Istio's GetKeyCertsForXDS: (cert chain, key) presented to istiod, if any."""
    prov = cfg.env[E.PROV_CERT]
    if prov:
        return f"{prov}/cert-chain.pem", f"{prov}/key.pem"
    if file_mounted:
        meta = cfg.proxy.proxy_metadata
        return meta.get("ISTIO_META_TLS_CLIENT_CERT_CHAIN", ""), meta.get("ISTIO_META_TLS_CLIENT_KEY", "")
    return "", ""


def mesh_settings(cfg: AgentConfig) -> MeshSettings:
    """Raises ConfigError (a root that must exist does not, settings that exclude each other)."""
    env = cfg.env
    proxy = cfg.proxy
    socket_file = cfg.node.workload_identity_socket_file
    if socket_file != Path(socket_file).name:
        raise ConfigError(E.WORKLOAD_IDENTITY_SOCKET_FILE.source, socket_file, "must be a file name, not a path")
    file_mounted = env[E.FILE_MOUNTED_CERTS]
    if env[E.PROV_CERT] and file_mounted:
        raise ConfigError(E.PROV_CERT.source, "", "PROV_CERT and FILE_MOUNTED_CERTS are mutually exclusive")
    cert_chain, key, root = f"{CERT_DIR}/cert-chain.pem", f"{CERT_DIR}/key.pem", f"{CERT_DIR}/root-cert.pem"
    mounted = tuple(f"{WORKLOAD_CREDENTIALS}/{name}" for name in ("cert-chain.pem", "key.pem", "root-cert.pem"))
    if all(_exists(path) for path in mounted):
        log.info("workload certificate files detected in %s: not using a CA", WORKLOAD_CREDENTIALS)
        cert_chain, key, root = mounted
        file_mounted = True

    tls_wanted = proxy.control_plane_auth_policy != "NONE"
    cluster_id = env[E.ISTIO_META_CLUSTER_ID]
    token = TOKEN_PATH if env[E.CREDENTIAL_FETCHER_TYPE] in ("JWT", "") else ""
    client_chain, client_key = _client_pair(cfg, file_mounted)
    xds = None
    if not cfg.local_xds_dir:
        tls = None
        if tls_wanted:
            tls = TlsSettings(
                root_cert=xds_root(cfg, file_mounted),
                server_name=server_name(proxy.discovery_address, env[E.ISTIOD_SAN]),
                client_cert=client_chain,
                client_key=client_key,
            )
        upstream = UpstreamSettings(proxy.discovery_address, tls, token, _headers(env, cluster_id, E.XDS_HEADER))
        xds = XdsProxySettings(socket_path=f"{proxy.config_path}/XDS", upstream=upstream)

    ca = None
    if not file_mounted:
        address = env[E.CA_ADDR] or proxy.discovery_address
        # The CA's TLS name is ISTIOD_SAN only when the CA is istiod at the discovery address (Istio).
        san = env[E.ISTIOD_SAN] if not env[E.CA_ADDR] else ""
        ca_tls = None
        if not address.endswith(":15010"):  # istiod's plaintext port: a secure network (Istio's special case)
            prov = env[E.PROV_CERT]
            ca_tls = TlsSettings(
                root_cert=ca_root(cfg),
                server_name=server_name(address, san),
                client_cert=f"{prov}/cert-chain.pem" if prov else "",
                client_key=f"{prov}/key.pem" if prov else "",
            )
        ca = UpstreamSettings(address, ca_tls, token, _headers(env, cluster_id, E.CA_HEADER))

    cache = SecretCacheSettings(
        identity=spiffe_id(env[E.TRUST_DOMAIN], cfg.pod_namespace, cfg.service_account),
        key_options=KeyOptions(
            rsa_key_size=env[E.WORKLOAD_RSA_KEY_SIZE],
            ecc_signature_algorithm=env[E.ECC_SIGNATURE_ALGORITHM],
            ecc_curve=env[E.ECC_CURVE],
            pkcs8=env[E.PKCS8_KEY],
        ),
        ttl=int(env[E.SECRET_TTL]),
        grace_ratio=env[E.SECRET_GRACE_PERIOD_RATIO],
        grace_jitter=env[E.SECRET_GRACE_PERIOD_RATIO_JITTER],
        cert_chain_file=cert_chain,
        key_file=key,
        root_cert_file=root,
        output_dir=env[E.OUTPUT_CERTS],
        output_mode=0o644 if env[E.KUBERNETES_SERVICE_HOST] else 0o600,
        file_debounce=env[E.FILE_DEBOUNCE_DURATION],
        os_root_file=os_root_file(),
    )
    return MeshSettings(
        xds=xds,
        sds_socket=f"{SDS_SOCKET_DIR}/{socket_file}",
        custom_sds_socket=socket_file != ISTIO_SOCKET_FILE,
        cache=cache,
        ca=ca,
        cert_signer=env[E.ISTIO_META_CERT_SIGNER],
    )
