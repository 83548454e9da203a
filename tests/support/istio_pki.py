"""The credentials a mesh without Kubernetes needs, made by the test: a plug-in CA for istiod, workload certificates,
and service-account JWTs with the JWKS that verifies them.

- `MeshCA`: a root and an intermediate (RSA 2048), written as Istio's plug-in CA bundle (`ca-cert.pem`, `ca-key.pem`,
  `root-cert.pem`, `cert-chain.pem` = intermediate + root) for istiod's `ROOT_CA_DIR`; `workload_cert()` mints a
  SPIFFE certificate signed by the intermediate (the `PROV_CERT` / `./etc/certs` variants).
- `JwtIssuer`: RS256 tokens shaped like Kubernetes projected service-account tokens (`sub:
  system:serviceaccount:<ns>:<sa>`, `aud` a list, `exp`), which istiod's `JWT_RULE` authenticator accepts
  (security/pkg/server/ca/authenticate/oidc.go), and `serving_jwks()`, an HTTP server for its JWKS.
"""

from __future__ import annotations

import datetime
import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.probes import enter_netns

TRUST_DOMAIN = "cluster.local"
ISTIO_CA_AUDIENCE = "istio-ca"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ca_cert(
    subject: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None, issuer_key: rsa.RSAPrivateKey
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class MeshCA:
    """A root CA and the intermediate istiod signs with. Generated once per instance (RSA 2048: ~0.1 s)."""

    root_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))
    ca_key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def __post_init__(self) -> None:
        self.root = _ca_cert("Root CA", self.root_key, None, self.root_key)
        self.ca = _ca_cert("Intermediate CA", self.ca_key, self.root, self.root_key)

    @property
    def root_pem(self) -> bytes:
        return _pem(self.root)

    @property
    def chain_pem(self) -> bytes:
        """cert-chain.pem of the plug-in bundle: the intermediate, then the root."""
        return _pem(self.ca) + _pem(self.root)

    def write_plugin_bundle(self, directory: Path) -> Path:
        """Istio's plug-in CA files (what `istioctl` docs call cacerts): istiod reads them from ROOT_CA_DIR."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca-cert.pem").write_bytes(_pem(self.ca))
        (directory / "ca-key.pem").write_bytes(_key_pem(self.ca_key))
        (directory / "root-cert.pem").write_bytes(self.root_pem)
        (directory / "cert-chain.pem").write_bytes(self.chain_pem)
        return directory

    def workload_cert(
        self, namespace: str, service_account: str, hours: float = 24.0, trust_domain: str = TRUST_DOMAIN
    ) -> tuple[bytes, bytes]:
        """(key.pem, cert-chain.pem: leaf + intermediate + root) for spiffe://<td>/ns/<ns>/sa/<sa> (ECDSA P-256)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        spiffe = f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)]))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=hours))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        return _key_pem(key), _pem(cert) + self.chain_pem


@dataclass
class JwtIssuer:
    """Signs service-account tokens; istiod fetches the keys from `jwks_uri` (see `serving_jwks`)."""

    issuer: str = "https://jwt.pilot-agent-py.test"
    kid: str = "test-key"
    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def token(
        self,
        namespace: str,
        service_account: str,
        audiences: tuple[str, ...] = (ISTIO_CA_AUDIENCE,),
        lifetime_s: float = 3600.0,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            # A list, never a bare string: istiod unmarshals `aud` into []string.
            "aud": list(audiences),
            "iat": now,
            "exp": now + int(lifetime_s),
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})

    def jwks(self) -> bytes:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return json.dumps({"keys": [{**public, "kid": self.kid, "alg": "RS256", "use": "sig"}]}).encode()

    def jwt_rule(self, jwks_uri: str, audiences: tuple[str, ...] = (ISTIO_CA_AUDIENCE,)) -> str:
        """istiod's JWT_RULE env value (a security.istio.io JWTRule as JSON)."""
        return json.dumps({"issuer": self.issuer, "jwks_uri": jwks_uri, "audiences": list(audiences)})


@dataclass
class JwksServer:
    url: str
    requests: list[str]


@contextmanager
def serving_jwks(issuer: JwtIssuer, netns: Path | None = None) -> Iterator[JwksServer]:
    """Serve `issuer`'s JWKS at http://127.0.0.1:<port>/jwks in `netns` (None: this process's namespace)."""
    body = issuer.jwks()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            status, payload = (200, body) if self.path.split("?")[0] == "/jwks" else (404, b"not found\n")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            return

    box: dict[str, http.server.ThreadingHTTPServer] = {}

    def bind() -> None:
        # A socket belongs to the namespace of the thread that created it; serving can then happen anywhere.
        if netns is not None:
            enter_netns(netns)
        box["server"] = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    binder = threading.Thread(target=bind, name="jwks-bind")
    binder.start()
    binder.join()
    server = box["server"]
    thread = threading.Thread(target=server.serve_forever, name="jwks", daemon=True)
    thread.start()
    try:
        yield JwksServer(f"http://127.0.0.1:{server.server_address[1]}/jwks", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
