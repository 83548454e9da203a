"""Keys, CSRs and certificates (Istio's security/pkg/pki/util), with `cryptography`.

Pure functions over PEM bytes. Key generation is CPU work (an RSA 2048 key takes tens of milliseconds). The PEM
text functions (pem_blocks, concat_certs, merge_roots) need no `cryptography`, and importing this module does not
load it: the functions that parse or make keys and certificates import it when called. The CA path of the agent
calls those in a short-lived worker (agent.security.key_worker), so the long-running agent never loads it there
(~10 MiB resident, ~60 ms of import).
"""

from __future__ import annotations

import datetime
import re
from typing import TYPE_CHECKING

from agent.security.settings import KeyOptions

if TYPE_CHECKING:
    from cryptography import x509

# Istio's MinimumRsaKeySize.
MINIMUM_RSA_KEY_SIZE = 2048

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


class PkiError(Exception):
    """A key, CSR or certificate could not be made or read; the message says which and why."""


def generate_csr(identity: str, options: KeyOptions) -> tuple[bytes, bytes]:
    """A new private key and a CSR for it, as Istio's GenCSR makes them: subject `O=` (one empty organization), a
    critical subjectAltName holding the URI `identity`. Returns (csr PEM, key PEM): PKCS#1 `RSA PRIVATE KEY` / SEC1
    `EC PRIVATE KEY`, or PKCS#8 with `options.pkcs8`."""
    from cryptography import x509  # noqa: PLC0415 (see the module's docstring)
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if options.ecc_signature_algorithm:
        if options.ecc_signature_algorithm != "ECDSA":
            raise PkiError(f"unsupported EC signature algorithm {options.ecc_signature_algorithm!r} (only ECDSA)")
        curve = ec.SECP384R1() if options.ecc_curve == "P384" else ec.SECP256R1()
        key = ec.generate_private_key(curve)
    else:
        if options.rsa_key_size < MINIMUM_RSA_KEY_SIZE:
            raise PkiError(
                f"requested key size does not meet the minimum required size of {MINIMUM_RSA_KEY_SIZE} "
                f"(requested: {options.rsa_key_size})"
            )
        key = rsa.generate_private_key(public_exponent=65537, key_size=options.rsa_key_size)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "")]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_format = serialization.PrivateFormat.PKCS8 if options.pkcs8 else serialization.PrivateFormat.TraditionalOpenSSL
    key_pem = key.private_bytes(serialization.Encoding.PEM, key_format, serialization.NoEncryption())
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


def pem_blocks(data: bytes, kind: str = "CERTIFICATE") -> list[bytes]:
    """The PEM blocks of one kind in `data`, each ending in a newline."""
    blocks = []
    for match in _PEM_BLOCK.finditer(data):
        if match.group(1).decode() == kind:
            block = match.group(0)
            blocks.append(block if block.endswith(b"\n") else block + b"\n")
    return blocks


def concat_certs(pems: list[str]) -> bytes:
    """Istio's concatCerts: the PEMs joined, each one starting on a new line."""
    out = []
    for i, pem in enumerate(pems):
        out.append(pem)
        if i < len(pems) - 1 and not pem.endswith("\n"):
            out.append("\n")
    return "".join(out).encode()


def leaf_certificate(chain_pem: bytes) -> x509.Certificate:
    """The first certificate of a PEM chain; PkiError if there is none or it does not parse."""
    from cryptography import x509  # noqa: PLC0415 (see the module's docstring)

    blocks = pem_blocks(chain_pem)
    if not blocks:
        raise PkiError("no certificate found in the PEM data")
    try:
        return x509.load_pem_x509_certificate(blocks[0])
    except ValueError as exc:
        raise PkiError(f"the certificate does not parse: {exc}") from None


def not_after(chain_pem: bytes) -> datetime.datetime:
    """The leaf certificate's NotAfter (UTC): Istio's ParseCertAndGetExpiryTimestamp."""
    return leaf_certificate(chain_pem).not_valid_after_utc


def valid_root_certs(pem: bytes) -> tuple[bytes, list[str]]:
    """Istio's ParseRootCerts: the certificates of `pem` that parse, re-encoded, and an error per one that does not
    (a root with a negative serial, say, is skipped rather than failing the whole bundle)."""
    from cryptography import x509  # noqa: PLC0415 (see the module's docstring)
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    valid: list[bytes] = []
    errors: list[str] = []
    for block in pem_blocks(pem):
        try:
            cert = x509.load_pem_x509_certificate(block)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        valid.append(cert.public_bytes(serialization.Encoding.PEM))
    if not valid and not errors and pem.strip():
        errors.append("invalid PEM encoded certificate")
    return b"".join(valid), errors


def check_key_pair(chain_pem: bytes, key_pem: bytes, *, own_key: bool = False) -> None:
    """Go's tls.X509KeyPair check: the chain's leaf parses and the key is the private half of its public key.
    Raises PkiError naming what is wrong. `own_key`: the key is one `generate_csr` made, so OpenSSL's RSA
    consistency check (a primality test of both factors, ~35 ms for RSA 2048, on the way to the first
    certificate) is skipped; the public halves are still compared."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 (see the module's docstring)

    leaf = leaf_certificate(chain_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None, unsafe_skip_rsa_key_validation=own_key)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"the private key does not parse: {exc}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != leaf.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise PkiError("private key does not match public key")


def merge_roots(*bundles: bytes) -> bytes:
    """Istio's mergeConfigTrustBundle: every certificate of the bundles once, sorted by PEM text."""
    unique = {block for bundle in bundles for block in pem_blocks(bundle)}
    return b"".join(sorted(unique))
