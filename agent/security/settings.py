"""The certificate side's settings: frozen data, light imports (read before Envoy's exec, while the modules that
use them load after it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Istio's totalTimeout: how long a file that does not parse yet (a half-written rotation) is retried.
FILE_RETRY_TOTAL = 10.0

# Where Go finds the OS bundle (pkg/security GetOSRootFilePath).
OS_ROOT_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/usr/local/etc/ssl/cert.pem",
    "/etc/ssl/certs/ca-certificates",
)


@dataclass(frozen=True)
class TlsSettings:
    """`root_cert`: a PEM file, or "" for the system's roots. `server_name`: the name istiod's certificate must
    carry. `client_cert`/`client_key`: a client certificate to present (PROV_CERT, FILE_MOUNTED_CERTS), if any."""

    root_cert: str
    server_name: str
    client_cert: str = ""
    client_key: str = ""


@dataclass(frozen=True)
class UpstreamSettings:
    """One gRPC peer of the agent (istiod's xDS, the CA). `tls=None` is plaintext. `token_path`: the JWT sent as
    `authorization: Bearer` (read per call; a missing file sends none, as Istio). `headers`: sent on every call
    (`clusterid`, then XDS_HEADER_* / CA_HEADER_*), keys lower-case as gRPC requires."""

    address: str
    tls: TlsSettings | None
    token_path: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """For log lines and readiness reasons: where, and with what trust."""
        if self.tls is None:
            return f"{self.address} (plaintext)"
        root = self.tls.root_cert or "system roots"
        return f"{self.address} (TLS: root {root}, server name {self.tls.server_name})"


def server_name(address: str, san: str = "") -> str:
    """The TLS name istiod must present: `san` (ISTIOD_SAN) if set, else the address's host, where anything with
    "localhost" in it means istiod's own name (port-forwarded debugging; Istio's getTLSDialOption)."""
    if san:
        return san
    host = address.rsplit(":", 1)[0] if ":" in address else ""
    host = host.strip("[]")
    return "istiod.istio-system.svc" if "localhost" in host else host


@dataclass(frozen=True)
class KeyOptions:
    """WORKLOAD_RSA_KEY_SIZE, ECC_SIGNATURE_ALGORITHM (only "ECDSA"), ECC_CURVE (P256, P384), PKCS8_KEY."""

    rsa_key_size: int = 2048
    ecc_signature_algorithm: str = ""
    ecc_curve: str = "P256"
    pkcs8: bool = False


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass(frozen=True)
class SecretCacheSettings:
    """`identity`: the SPIFFE URI the CSR asks for. `ttl`: SECRET_TTL in seconds. `output_mode`: 0600, or 0644
    when running in Kubernetes (other containers of the pod may read OUTPUT_CERTS)."""

    identity: str = ""
    key_options: KeyOptions = field(default_factory=KeyOptions)
    ttl: int = 86_400
    grace_ratio: float = 0.5
    grace_jitter: float = 0.01
    cert_chain_file: str = "./etc/certs/cert-chain.pem"
    key_file: str = "./etc/certs/key.pem"
    root_cert_file: str = "./etc/certs/root-cert.pem"
    output_dir: str = ""
    output_mode: int = 0o600
    file_debounce: float = 0.1
    os_root_file: str = ""
    # How long a file that does not parse yet (a half-written rotation) is retried (Istio: 10 s).
    file_retry_total: float = FILE_RETRY_TOTAL


def os_root_file() -> str:
    """The OS CA bundle `file-root:system` serves, "" when there is none."""
    return next((path for path in OS_ROOT_FILES if Path(path).exists()), "")
