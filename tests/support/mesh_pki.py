"""A test mesh CA with `cryptography`: a root, an intermediate that signs, workload and server certificates.

Shaped like Istio's plug-in CA (`cacerts`): `write_plugin_bundle(dir)` writes ca-cert.pem, ca-key.pem,
root-cert.pem and cert-chain.pem, which istiod uses to sign workload certificates. `issue()` signs a CSR the way
istiod does: the identities come from the caller's authentication, never from the CSR's SANs.
ECDSA P-256 throughout: keys are made in microseconds, so tests can make many.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _ca_cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"), x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=3650))
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
        .sign(signer, hashes.SHA256())
    )


@dataclass
class MeshCa:
    """A root and an intermediate (the signing CA)."""

    name: str = "test"
    root_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    ca_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)

    def __post_init__(self) -> None:
        self.root = _ca_cert(f"{self.name} root", self.root_key, None, self.root_key)
        self.ca = _ca_cert(f"{self.name} intermediate", self.ca_key, self.root, self.root_key)

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(PEM)

    @property
    def ca_pem(self) -> bytes:
        return self.ca.public_bytes(PEM)

    def _leaf(
        self,
        public_key: ec.EllipticCurvePublicKey | object,
        sans: list[x509.GeneralName],
        ttl: datetime.timedelta,
        not_before: datetime.datetime | None = None,
    ) -> bytes:
        start = not_before or _now() - datetime.timedelta(seconds=1)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + ttl)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        return builder.sign(self.ca_key, hashes.SHA256()).public_bytes(PEM)

    def issue(self, csr_pem: bytes, identities: list[str], ttl_seconds: int) -> list[str]:
        """istiod's answer to a CSR: [leaf, intermediate, root] as PEM strings; SANs = `identities`."""
        csr = x509.load_pem_x509_csr(csr_pem)
        leaf = self._leaf(
            csr.public_key(),
            [x509.UniformResourceIdentifier(i) for i in identities],
            datetime.timedelta(seconds=ttl_seconds),
        )
        return [leaf.decode(), self.ca_pem.decode(), self.root_pem.decode()]

    def workload(
        self,
        identity: str,
        ttl: datetime.timedelta = datetime.timedelta(days=1),
        not_before: datetime.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A key and chain (leaf + intermediate) for `identity`, as file-mounted certificates."""
        key = _key()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity)]
        chain = self._leaf(key.public_key(), sans, ttl, not_before) + self.ca_pem
        return chain, key_pem(key)

    def server(self, dns_names: list[str], ttl: datetime.timedelta = datetime.timedelta(days=1)) -> tuple[bytes, bytes]:
        """A key and chain for a TLS server (istiod's serving certificate)."""
        key = _key()
        chain = self._leaf(key.public_key(), [x509.DNSName(n) for n in dns_names], ttl) + self.ca_pem
        return chain, key_pem(key)

    def write_plugin_bundle(self, directory: Path) -> None:
        """istiod's `cacerts`: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem (intermediate + root)."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca-cert.pem").write_bytes(self.ca_pem)
        (directory / "ca-key.pem").write_bytes(key_pem(self.ca_key))
        (directory / "root-cert.pem").write_bytes(self.root_pem)
        (directory / "cert-chain.pem").write_bytes(self.ca_pem + self.root_pem)


def serial_of(chain_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(chain_pem).serial_number


def uri_sans(chain_pem: bytes) -> list[str]:
    cert = x509.load_pem_x509_certificate(chain_pem)
    return list(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    )


def served_certificate(port: int, ca: MeshCa, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """The certificate a mesh mTLS listener presents (PEM), to a client holding a certificate of `ca`."""
    import socket  # noqa: PLC0415
    import ssl  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    chain, key = ca.workload("spiffe://cluster.local/ns/test/sa/client")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.root_pem.decode())
    with tempfile.TemporaryDirectory() as directory:  # ssl loads a client certificate from files only
        (Path(directory) / "c.pem").write_bytes(chain)
        (Path(directory) / "k.pem").write_bytes(key)
        context.load_cert_chain(Path(directory) / "c.pem", Path(directory) / "k.pem")
    with socket.create_connection((host, port), timeout=timeout) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()
