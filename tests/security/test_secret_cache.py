"""The secret cache (Istio's secretcache_test.go cases): CA-issued certificates and their rotation, file
certificates and their watch, OUTPUT_CERTS, the pre-warm through a CA outage."""

from __future__ import annotations

import asyncio
import datetime
import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from agent.security import pki
from agent.security.caclient import CaError
from agent.security.key_worker import KeyWorker
from agent.security.metrics import SecurityMetrics
from agent.security.secret_cache import SecretCache, rotation_delay
from agent.security.secrets import SecretError, SecretItem
from agent.security.settings import KeyOptions, SecretCacheSettings
from tests.security.conftest import IDENTITY, StubSigner
from tests.support.mesh_pki import MeshCa, serial_of, uri_sans


class Updates:
    """What the cache told SDS to push, in order."""

    def __init__(self, cache: SecretCache) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        cache.on_update = self.queue.put_nowait

    async def next(self, timeout: float = 10.0) -> str:
        async with asyncio.timeout(timeout):
            return await self.queue.get()


def make_cache(settings: SecretCacheSettings, signer: StubSigner | None) -> SecretCache:
    return SecretCache(settings, signer, SecurityMetrics(CollectorRegistry()))


@asynccontextmanager
async def running(cache: SecretCache, *, prewarm: bool = False) -> AsyncIterator[None]:
    task = asyncio.create_task(cache.run(prewarm=prewarm, prewarm_first_wait=0.01))
    try:
        await asyncio.wait_for(cache.watcher.ready.wait(), 10)
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def settings_in(directory: Path, **kwargs: object) -> SecretCacheSettings:
    certs = directory / "etc/certs"
    return SecretCacheSettings(
        identity=IDENTITY,
        cert_chain_file=str(certs / "cert-chain.pem"),
        key_file=str(certs / "key.pem"),
        root_cert_file=str(certs / "root-cert.pem"),
        file_retry_total=0.2,
        **kwargs,  # type: ignore[arg-type]
    )


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# -- rotation time -----------------------------------------------------------------------------------------------


def test_rotation_at_the_grace_ratio_of_the_lifetime() -> None:
    item = SecretItem("default", created=1000.0, expires=2000.0)
    assert rotation_delay(item, 0.5, 0.0, now=1000.0, rand=random.Random(1)) == 500.0
    assert rotation_delay(item, 0.2, 0.0, now=1000.0, rand=random.Random(1)) == 800.0
    assert rotation_delay(item, 1.0, 0.0, now=1000.0, rand=random.Random(1)) == 0.0
    assert rotation_delay(item, 0.5, 0.0, now=1900.0, rand=random.Random(1)) == 0.0  # overdue: now


def test_rotation_jitter_stays_within_its_ratio() -> None:
    item = SecretItem("default", created=0.0, expires=1000.0)
    delays = {rotation_delay(item, 0.5, 0.1, now=0.0, rand=random.Random(seed)) for seed in range(200)}
    assert all(400.0 <= d <= 600.0 for d in delays)
    assert min(delays) < 480.0 and max(delays) > 520.0  # both directions used
    # The ratio with its jitter is clamped to [0, 1]: never before creation, never after expiry.
    low = [rotation_delay(item, 0.0, 0.5, now=0.0, rand=random.Random(s)) for s in range(50)]
    high = [rotation_delay(item, 1.0, 0.5, now=0.0, rand=random.Random(s)) for s in range(50)]
    assert all(500.0 <= d <= 1000.0 for d in low) and 1000.0 in low
    assert all(0.0 <= d <= 500.0 for d in high) and 0.0 in high


# -- the CA ------------------------------------------------------------------------------------------------------


async def test_csr_is_sent_once_and_cached(short_dir: Path, mesh_ca: MeshCa) -> None:
    signer = StubSigner(mesh_ca)
    cache = make_cache(settings_in(short_dir), signer)
    first, root, again = await asyncio.gather(
        cache.generate("default"), cache.generate("ROOTCA"), cache.generate("default")
    )
    assert signer.calls == 1
    assert first.certificate_chain == again.certificate_chain
    assert uri_sans(first.certificate_chain) == [IDENTITY]
    assert root.root_cert == mesh_ca.root_pem
    pki.check_key_pair(first.certificate_chain, first.private_key)
    assert b"BEGIN RSA PRIVATE KEY" in first.private_key  # Istio's default: RSA 2048, PKCS#1
    expiry = cache.metrics.registry.get_sample_value("istio_agent_cert_expiry_seconds", {"resource_name": "default"})
    assert expiry is not None and 86_000 < expiry <= 86_400


async def test_ecdsa_and_pkcs8_keys(short_dir: Path, mesh_ca: MeshCa) -> None:
    options = KeyOptions(ecc_signature_algorithm="ECDSA", ecc_curve="P384", pkcs8=True)
    cache = make_cache(settings_in(short_dir, key_options=options), StubSigner(mesh_ca))
    item = await cache.generate("default")
    assert item.private_key.startswith(b"-----BEGIN PRIVATE KEY-----")
    public = pki.leaf_certificate(item.certificate_chain).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"


async def test_rotation_issues_a_new_certificate_and_pushes_it(short_dir: Path, mesh_ca: MeshCa) -> None:
    signer = StubSigner(mesh_ca)
    signer.ttl = 2  # a CA that issues 2-second certificates: rotation after about 1 s
    cache = make_cache(settings_in(short_dir, grace_jitter=0.0), signer)
    updates = Updates(cache)
    async with running(cache):
        first = await cache.generate("default")
        # The first root seen counts as a new one (Istio's too), and the 2-second certificate's rotation tells SDS
        # to ask again: in either order (the rotation timer, set once the chain is checked, may fire before the key
        # worker has exited and the root is pushed, on a loaded machine).
        assert {await updates.next(), await updates.next()} == {"ROOTCA", "default"}
        second = await cache.generate("default")
        assert serial_of(second.certificate_chain) != serial_of(first.certificate_chain)
        assert signer.calls == 2
        # Same root: no ROOTCA push (it would be queued by now: generate pushes it before returning). A `default`
        # may be: the 2-second certificate's own rotation, on a loaded machine where the key worker is slow.
        queued = [updates.queue.get_nowait() for _ in range(updates.queue.qsize())]
        assert "ROOTCA" not in queued


async def test_a_certificate_due_when_issued_is_renewed_with_backoff(short_dir: Path, mesh_ca: MeshCa) -> None:
    # A 1 s certificate from a CA whose clock is a second behind: expired on arrival. Renewing at once (Istio's
    # rotateTime is 0 then) signed a key and called the CA ~12 times a second, for as long as the CA was off.
    signer = StubSigner(mesh_ca)
    signer.ttl = 1
    now = time.time() + 5  # the agent's clock: the CA's certificates are all expired by then
    settings = settings_in(short_dir, grace_jitter=0.0)
    cache = SecretCache(settings, signer, SecurityMetrics(CollectorRegistry()), clock=lambda: now)
    waits = []
    for _ in range(3):
        item = await cache.generate("default")
        assert item.expires < now and cache._rotation_at is not None
        waits.append(cache._rotation_at - now)
        cache._workload = None  # what rotation does
    assert waits == [0.5, 1.0, 2.0]


async def test_a_chain_for_another_key_is_a_failed_csr(short_dir: Path, mesh_ca: MeshCa) -> None:
    # Served, Envoy would NACK it and keep nothing better until the next rotation, hours later.
    class OtherKey(StubSigner):
        async def sign(self, csr_pem: bytes, ttl_seconds: int) -> list[str]:
            self.calls += 1
            chain, _ = self.ca.workload(self.identity)
            return [chain.decode()]

    cache = make_cache(settings_in(short_dir), OtherKey(mesh_ca))
    with pytest.raises(SecretError, match="private key does not match public key"):
        await cache.generate("default")
    assert cache.ca_error is not None


async def test_a_new_root_pushes_rootca(short_dir: Path, mesh_ca: MeshCa) -> None:
    signer = StubSigner(mesh_ca)
    cache = make_cache(settings_in(short_dir), signer)
    updates = Updates(cache)
    await cache.generate("ROOTCA")
    signer.ca = MeshCa("rotated")
    cache._workload = None  # what rotation does
    await cache.generate("default")
    assert await updates.next() == "ROOTCA"
    assert (await cache.generate("ROOTCA")).root_cert == signer.ca.root_pem


async def test_ca_failure_is_a_secret_error_and_remembered(short_dir: Path, mesh_ca: MeshCa) -> None:
    signer = StubSigner(mesh_ca)
    signer.fail_with = CaError("create certificate: UNAUTHENTICATED: bad token", grpc.StatusCode.UNAUTHENTICATED)
    cache = make_cache(settings_in(short_dir), signer)
    with pytest.raises(SecretError, match="UNAUTHENTICATED: bad token"):
        await cache.generate("default")
    assert cache.ca_error is not None and cache.ca_error.refused
    signer.fail_with = None
    await cache.generate("default")
    assert cache.ca_error is None


async def test_prewarm_recovers_from_a_ca_outage(short_dir: Path, mesh_ca: MeshCa) -> None:
    signer = StubSigner(mesh_ca)
    signer.fail_with = CaError("UNAVAILABLE", grpc.StatusCode.UNAVAILABLE)
    out = short_dir / "out"
    cache = make_cache(settings_in(short_dir, output_dir=str(out)), signer)
    async with running(cache, prewarm=True):
        await signer.wait_for_calls(2)
        signer.fail_with = None
        await asyncio.wait_for(cache.warmed.wait(), 10)
    assert (out / "root-cert.pem").read_bytes() == mesh_ca.root_pem
    pki.check_key_pair((out / "cert-chain.pem").read_bytes(), (out / "key.pem").read_bytes())
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600


async def test_unknown_names_and_no_ca(short_dir: Path) -> None:
    cache = make_cache(settings_in(short_dir), None)
    with pytest.raises(SecretError, match="unknown secret name"):
        await cache.generate("something")
    with pytest.raises(SecretError, match="no CA client"):
        await cache.generate("default")


# -- files -------------------------------------------------------------------------------------------------------


async def test_a_key_asked_for_ahead_signs_the_first_csr(short_dir: Path, mesh_ca: MeshCa) -> None:
    options = KeyOptions(ecc_signature_algorithm="ECDSA")
    ahead = KeyWorker()
    await ahead.request_csr(IDENTITY, options)
    process = ahead._process
    assert process is not None
    cache = SecretCache(
        settings_in(short_dir, key_options=options), StubSigner(mesh_ca), SecurityMetrics(CollectorRegistry()),
        key_ahead=ahead,
    )  # fmt: skip
    item = await cache.generate("default")
    pki.check_key_pair(item.certificate_chain, item.private_key)
    assert process.returncode == 0  # the worker asked ahead made this key, then ended
    await cache.close()


async def test_a_key_asked_for_ahead_ends_when_files_are_served(short_dir: Path, mesh_ca: MeshCa) -> None:
    settings = settings_in(short_dir)
    chain, key = mesh_ca.workload(IDENTITY)
    write_atomically(Path(settings.cert_chain_file), chain)
    write_atomically(Path(settings.key_file), key)
    ahead = KeyWorker()
    await ahead.request_csr(IDENTITY, settings.key_options)
    process = ahead._process
    assert process is not None
    signer = StubSigner(mesh_ca)
    cache = SecretCache(settings, signer, SecurityMetrics(CollectorRegistry()), key_ahead=ahead)
    async with running(cache):
        assert (await cache.generate("default")).certificate_chain == chain
        assert signer.calls == 0
        assert process.returncode is not None  # not left running for a CSR that never comes


async def test_etc_certs_are_served_and_watched(short_dir: Path, mesh_ca: MeshCa) -> None:
    settings = settings_in(short_dir)
    chain, key = mesh_ca.workload(IDENTITY)
    write_atomically(Path(settings.cert_chain_file), chain)
    write_atomically(Path(settings.key_file), key)
    write_atomically(Path(settings.root_cert_file), mesh_ca.root_pem)
    signer = StubSigner(mesh_ca)
    cache = make_cache(settings, signer)
    updates = Updates(cache)
    async with running(cache):
        assert (await cache.generate("default")).certificate_chain == chain
        assert (await cache.generate("ROOTCA")).root_cert == mesh_ca.root_pem
        assert signer.calls == 0
        new_chain, new_key = mesh_ca.workload(IDENTITY)
        write_atomically(Path(settings.key_file), new_key)
        write_atomically(Path(settings.cert_chain_file), new_chain)
        assert await updates.next() == "default"
        assert (await cache.generate("default")).certificate_chain == new_chain


async def test_output_certs_into_etc_certs_does_not_read_them_back(short_dir: Path, mesh_ca: MeshCa) -> None:
    """VMs write to ./etc/certs themselves: reading those files back would never rotate."""
    settings = settings_in(short_dir)
    certs = Path(settings.cert_chain_file).parent
    chain, key = mesh_ca.workload("spiffe://cluster.local/ns/old/sa/old")
    write_atomically(certs / "cert-chain.pem", chain)
    write_atomically(certs / "key.pem", key)
    signer = StubSigner(mesh_ca)
    cache = make_cache(settings_in(short_dir, output_dir=str(certs)), signer)
    item = await cache.generate("default")
    assert signer.calls == 1 and uri_sans(item.certificate_chain) == [IDENTITY]
    assert (certs / "cert-chain.pem").read_bytes() == item.certificate_chain


async def test_output_certs_rewrites_only_what_changed(short_dir: Path, mesh_ca: MeshCa) -> None:
    out = short_dir / "out"
    cache = make_cache(settings_in(short_dir, output_dir=str(out), output_mode=0o644), StubSigner(mesh_ca))
    await cache.generate("ROOTCA")
    before = (out / "root-cert.pem").stat().st_ino
    await cache.generate("ROOTCA")
    assert (out / "root-cert.pem").stat().st_ino == before
    assert (out / "root-cert.pem").stat().st_mode & 0o777 == 0o644


async def test_file_cert_and_file_root(short_dir: Path, mesh_ca: MeshCa) -> None:
    chain, key = mesh_ca.workload("spiffe://cluster.local/ns/a/sa/b")
    files = short_dir / "dr"
    write_atomically(files / "chain.pem", chain)
    write_atomically(files / "key.pem", key)
    # A bundle with one certificate that does not parse: skipped, the valid one served.
    broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    write_atomically(files / "roots.pem", broken + mesh_ca.root_pem)
    cache = make_cache(settings_in(short_dir), None)
    pair = await cache.generate(f"file-cert:{files / 'chain.pem'}~{files / 'key.pem'}")
    assert (pair.certificate_chain, pair.private_key) == (chain, key)
    root = await cache.generate(f"file-root:{files / 'roots.pem'}")
    assert root.root_cert == mesh_ca.root_pem


async def test_bogus_files_are_errors(short_dir: Path, mesh_ca: MeshCa) -> None:
    chain, _ = mesh_ca.workload(IDENTITY)
    _, other_key = mesh_ca.workload(IDENTITY)
    files = short_dir / "bad"
    write_atomically(files / "chain.pem", chain)
    write_atomically(files / "key.pem", other_key)
    write_atomically(files / "garbage.pem", b"not a certificate")
    cache = make_cache(settings_in(short_dir), None)
    with pytest.raises(SecretError, match="private key does not match"):
        await cache.generate(f"file-cert:{files / 'chain.pem'}~{files / 'key.pem'}")
    with pytest.raises(SecretError, match="failed to parse root certs"):
        await cache.generate(f"file-root:{files / 'garbage.pem'}")
    with pytest.raises(SecretError, match="No such file"):
        await cache.generate(f"file-root:{files / 'missing.pem'}")
    assert cache.metrics.registry.get_sample_value("istio_agent_num_file_secret_failures_total") == 3


async def test_system_root(short_dir: Path, mesh_ca: MeshCa) -> None:
    bundle = short_dir / "os-bundle.pem"
    bundle.write_bytes(mesh_ca.root_pem)
    cache = make_cache(settings_in(short_dir, os_root_file=str(bundle)), None)
    assert (await cache.generate("file-root:system")).root_cert == mesh_ca.root_pem


async def test_kubernetes_data_swap_pushes_the_file_cert(short_dir: Path, mesh_ca: MeshCa) -> None:
    """A Secret volume: files are symlinks into `..data`, itself a symlink swapped by rename."""
    volume = short_dir / "volume"

    def publish(version: int, chain: bytes, key: bytes) -> None:
        data = volume / f"..2026_{version}"
        data.mkdir(parents=True)
        (data / "tls.crt").write_bytes(chain)
        (data / "tls.key").write_bytes(key)
        link = volume / "..data_tmp"
        link.symlink_to(data.name)
        os.replace(link, volume / "..data")

    chain, key = mesh_ca.workload(IDENTITY)
    publish(1, chain, key)
    for name in ("tls.crt", "tls.key"):
        (volume / name).symlink_to(f"..data/{name}")
    name = f"file-cert:{volume / 'tls.crt'}~{volume / 'tls.key'}"
    cache = make_cache(settings_in(short_dir), None)
    updates = Updates(cache)
    async with running(cache):
        assert (await cache.generate(name)).certificate_chain == chain
        new_chain, new_key = mesh_ca.workload(IDENTITY, ttl=datetime.timedelta(hours=2))
        publish(2, new_chain, new_key)
        assert await updates.next() == name
        assert (await cache.generate(name)).certificate_chain == new_chain
