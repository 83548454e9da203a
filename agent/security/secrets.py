"""Secrets as SDS serves them, and the ones read from files (Istio's security.SecretItem, generateFileSecret).

Resource names (pkg/security/security.go): `default` (the workload's key and certificate chain), `ROOTCA` (its
trust roots), `file-cert:<chain>~<key>`, `file-root:<path>`, `file-root:system` (the OS bundle).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.aio import off_loop
from agent.files import FileTooLarge, NotARegularFile, read_bounded
from agent.security import pki
from agent.security.settings import FILE_RETRY_TOTAL

WORKLOAD = "default"
ROOT = "ROOTCA"
FILE_CERT_PREFIX = "file-cert:"
FILE_ROOT_PREFIX = "file-root:"
SYSTEM_ROOT = "file-root:system"
SEPARATOR = "~"
# The files behind `file-root:`/`file-cert:` names come from istiod's configuration (a DestinationRule's
# caCertificates, say), not from the agent's: each is read bounded, only if it is a regular file, off the event loop.
# `file-root:/dev/zero` used to read on the loop until the agent was OOM-killed, a FIFO hung it for good. An OS
# bundle is ~200 KiB.
MAX_SECRET_FILE = 4 * 1024 * 1024


def read_secret_file(path: str) -> bytes:
    """The file's bytes: at most MAX_SECRET_FILE, a regular file only (else an OSError naming it). Blocking."""
    return read_bounded(Path(path), MAX_SECRET_FILE, regular_only=True)


class SecretError(Exception):
    """A secret could not be produced; the SDS stream that asked ends with this message (Envoy retries)."""


@dataclass(frozen=True)
class SecretItem:
    """What one SDS resource carries: a key and chain, or roots. Times are wall-clock seconds."""

    name: str
    certificate_chain: bytes = b""
    private_key: bytes = b""
    root_cert: bytes = b""
    created: float = 0.0
    expires: float = 0.0

    @property
    def is_root(self) -> bool:
        return bool(self.root_cert) and not self.certificate_chain


@dataclass(frozen=True)
class FileRef:
    """A resource name that is served from files: `chain`+`key`, or `root`."""

    chain: str = ""
    key: str = ""
    root: str = ""


def parse_file_name(name: str) -> FileRef | None:
    """Istio's SdsCertificateConfigFromResourceName; None for names that are not file names."""
    if name.startswith(FILE_CERT_PREFIX):
        parts = name[len(FILE_CERT_PREFIX) :].split(SEPARATOR)
        return FileRef(chain=parts[0], key=parts[1]) if len(parts) == 2 else None
    if name.startswith(FILE_ROOT_PREFIX):
        parts = name[len(FILE_ROOT_PREFIX) :].split(SEPARATOR)
        return FileRef(root=parts[0]) if len(parts) == 1 else None
    return None


def non_empty(*paths: str) -> bool:
    """Every file exists and is not empty (Istio's rootCertificateExist / keyCertificateExist)."""
    for path in paths:
        try:
            if not read_secret_file(path):
                return False
        except OSError:
            return False
    return True


async def _retrying(read: Callable[[], SecretItem], first_wait: float, total: float, what: str) -> SecretItem:
    """Call `read()` until it succeeds, waiting `first_wait` doubling (Istio: a rotation may be half-written when
    its first event arrives), for at most `total` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total
    wait = max(first_wait, 0.01)
    while True:
        try:
            return await off_loop(read, name="secret-read")
        except (NotARegularFile, FileTooLarge) as exc:  # not a half-written file: waiting will not help
            raise SecretError(f"{what}: {exc.filename}: {exc.strerror}") from None
        except (OSError, pki.PkiError, SecretError) as exc:
            if loop.time() + wait > deadline:
                raise SecretError(f"{what}: {getattr(exc, 'strerror', None) or exc}") from None
        await asyncio.sleep(wait)
        wait *= 2


async def read_root(name: str, path: str, first_wait: float, total: float = FILE_RETRY_TOTAL) -> SecretItem:
    """Roots from `path`: certificates that do not parse are skipped, none valid is an error."""

    def read() -> SecretItem:
        roots, errors = pki.valid_root_certs(read_secret_file(path))
        if not roots:
            raise SecretError(f"failed to parse root certs from file {path}: {'; '.join(errors) or 'no certificate'}")
        return SecretItem(name, root_cert=roots)

    return await _retrying(read, first_wait, total, f"root certificate {path}")


async def read_key_pair(
    name: str, chain_path: str, key_path: str, first_wait: float, total: float = FILE_RETRY_TOTAL
) -> SecretItem:
    """A key and chain from files, once they match (the key may be written before the chain)."""

    def read() -> SecretItem:
        chain = read_secret_file(chain_path)
        key = read_secret_file(key_path)
        pki.check_key_pair(chain, key)
        expires = pki.not_after(chain).timestamp()
        return SecretItem(name, certificate_chain=chain, private_key=key, created=time.time(), expires=expires)

    return await _retrying(read, first_wait, total, f"key pair {chain_path}, {key_path}")
