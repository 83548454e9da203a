"""The secret cache: what SDS serves for each resource name, and when it changes (Istio's
security/pkg/nodeagent/cache/secretcache.go SecretManagerClient).

- Files first: `default` and `ROOTCA` from ./etc/certs/{cert-chain,key,root-cert}.pem when present (not when
  OUTPUT_CERTS writes there, or nothing would ever rotate), `file-cert:`/`file-root:` names from the files they
  name. Files are read on every request (never cached) and watched with the agent's watcher (Kubernetes `..data`
  swaps included); a change calls `on_update(name)`, which pushes that name to the SDS streams watching it.
- Otherwise the CA: a new key and CSR, signed by istiod; the result is cached until its rotation time
  (SECRET_GRACE_PERIOD_RATIO of its life before NotAfter, with jitter), when the cache forgets it and calls
  `on_update("default")`: SDS asks again and a new CSR is sent. A new root seen in a CA answer pushes `ROOTCA`.
- OUTPUT_CERTS: every `default`/`ROOTCA` produced is also written there (key.pem, cert-chain.pem, root-cert.pem),
  atomically and only when changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.files import write_atomic
from agent.security import pki
from agent.security.caclient import CaError
from agent.security.key_worker import KeyWorker
from agent.security.metrics import SecurityMetrics
from agent.security.secrets import (
    ROOT,
    SYSTEM_ROOT,
    WORKLOAD,
    SecretError,
    SecretItem,
    non_empty,
    parse_file_name,
    read_key_pair,
    read_root,
)
from agent.security.settings import SecretCacheSettings
from agent.watch import ChangeSet, Watcher

log = logging.getLogger("agent.security.cache")

# Istio's pkg/backoff defaults, used by the pre-warm that fetches the first certificate before Envoy asks.
PREWARM_FIRST_WAIT = 0.5
PREWARM_MAX_WAIT = 60.0


class Signer(Protocol):
    """The CA (agent.security.caclient.CaClient): signs a CSR into a chain, leaf first; raises CaError."""

    async def sign(self, csr_pem: bytes, ttl_seconds: int) -> list[str]: ...

    async def close(self) -> None: ...


def rotation_delay(item: SecretItem, ratio: float, jitter: float, now: float, rand: random.Random) -> float:
    """Istio's rotateTime: seconds from `now` until the certificate is renewed, `ratio` (± up to `jitter`,
    clamped to [0, 1]) of its lifetime before it expires, never negative."""
    spread = rand.random() * jitter * rand.choice((-1, 1))
    grace = min(max(ratio + spread, 0.0), 1.0) * (item.expires - item.created)
    return max(item.expires - grace - now, 0.0)


class SecretCache:
    def __init__(
        self,
        settings: SecretCacheSettings,
        ca: Signer | None,
        metrics: SecurityMetrics,
        *,
        clock: Callable[[], float] = time.time,
        rand: random.Random | None = None,
        key_ahead: KeyWorker | None = None,
    ) -> None:
        """`key_ahead`: a key worker already asked for this identity's key (agent.mesh.listen), for the first CSR;
        ended once `default` is served, used or not."""
        self.settings = settings
        self._key_ahead = key_ahead
        self.ca = ca
        self.metrics = metrics
        self.clock = clock
        self.rand = rand or random.Random()
        # Set by the SDS server: push this resource name to the streams watching it.
        self.on_update: Callable[[str], None] = lambda name: None
        # The last CA failure (None after a success): what readiness reports while Envoy has no certificate.
        self.ca_error: CaError | None = None
        # A certificate was issued by the CA since the agent started.
        self.issued = False
        self._logged_ca_error = ""
        self._workload: SecretItem | None = None  # the CA-issued key, chain and root, until rotation
        self._rotation_at: float | None = None
        # Certificates in a row that were due for renewal when issued (each doubles the wait before the next).
        self._due_when_issued = 0
        self._rescheduled = asyncio.Event()
        self._root: bytes = b""  # the last root seen, to notice a new one
        self._csr_lock = asyncio.Lock()
        self._watched: dict[Path, set[str]] = {}
        # Set once the pre-warm has both `default` and `ROOTCA` (run(prewarm=True)).
        self.warmed = asyncio.Event()
        self.watcher = Watcher({}, self._on_files_changed, debounce=settings.file_debounce)

    # -- what SDS asks ---------------------------------------------------------------------------------------

    async def generate(self, name: str) -> SecretItem:
        """The secret for `name`. Raises SecretError (files unusable, CA failure, unknown name)."""
        item = await self._from_files(name)
        if item is None:
            item = await self._from_ca(name)
        if name == WORKLOAD:
            await self._drop_key_ahead()  # used by the CSR, or not needed: files are served
        if name in (WORKLOAD, ROOT):
            self._output(item)
        return item

    def _writes_to_cert_dir(self) -> bool:
        """OUTPUT_CERTS is the ./etc/certs directory itself: those files are ours, not a mounted source."""
        out = self.settings.output_dir
        if not out:
            return False
        try:
            return os.path.samefile(Path(self.settings.cert_chain_file).parent, out)
        except OSError:
            return Path(self.settings.cert_chain_file).parent.absolute() == Path(out).absolute()

    async def _from_files(self, name: str) -> SecretItem | None:
        s = self.settings
        wait = (s.file_debounce, s.file_retry_total)
        try:
            if name == ROOT and non_empty(s.root_cert_file) and not self._writes_to_cert_dir():
                item = await read_root(name, s.root_cert_file, *wait)
                self._root = item.root_cert
                self._watch(s.root_cert_file, name)
                return SecretItem(name, root_cert=pki.merge_roots(item.root_cert))
            if name == WORKLOAD and non_empty(s.cert_chain_file, s.key_file) and not self._writes_to_cert_dir():
                item = await read_key_pair(name, s.cert_chain_file, s.key_file, *wait)
                self._watch(s.cert_chain_file, name)  # a key never changes without its certificate
                return item
            if name == SYSTEM_ROOT:
                if not s.os_root_file:
                    raise SecretError("file-root:system: no OS CA certificate bundle was found")
                item = await read_root(name, s.os_root_file, *wait)
                self._watch(s.os_root_file, name)
                return item
            ref = parse_file_name(name)
            if ref is None:
                return None
            if ref.root:
                item = await read_root(name, ref.root, *wait)
                self._watch(ref.root, name)
            else:
                item = await read_key_pair(name, ref.chain, ref.key, *wait)
                self._watch(ref.chain, name)
            return item
        except SecretError as exc:
            self.metrics.file_secret_failures.inc()
            log.error("%s: failed to generate secret for proxy from file: %s", name, exc)
            raise

    def _watch(self, path: str, name: str) -> None:
        absolute = Path(path).absolute()
        self._watched.setdefault(absolute, set()).add(name)
        self.watcher.add({absolute: "sds"})

    def _on_files_changed(self, changes: ChangeSet) -> None:
        names = sorted({name for path in changes.changed + changes.deleted for name in self._watched.get(path, ())})
        for name in names:
            log.info("file certificate for %s changed, pushing to proxy", name)
            self.on_update(name)

    # -- the CA ----------------------------------------------------------------------------------------------

    async def _from_ca(self, name: str) -> SecretItem:
        if name not in (WORKLOAD, ROOT):
            raise SecretError(f"unknown secret name {name!r}")
        if self.ca is None:
            raise SecretError(f"{name}: no certificate files and no CA client (file-mounted certificates)")
        cached = self._cached(name)
        if cached is not None:
            return cached
        async with self._csr_lock:
            # Another request may have fetched it while this one waited.
            cached = self._cached(name)
            if cached is not None:
                return cached
            issued = await self._sign()
        if name == ROOT:
            self._root = issued.root_cert
            return SecretItem(name, root_cert=pki.merge_roots(issued.root_cert))
        if issued.root_cert != self._root:
            if self._root:
                log.info("Root cert has changed, start rotating root cert")
            self._root = issued.root_cert
            self.on_update(ROOT)
        return SecretItem(
            name, issued.certificate_chain, issued.private_key, created=issued.created, expires=issued.expires
        )

    def _cached(self, name: str) -> SecretItem | None:
        item = self._workload
        if item is None:
            return None
        if name == ROOT:
            return SecretItem(name, root_cert=pki.merge_roots(item.root_cert))
        return SecretItem(name, item.certificate_chain, item.private_key, created=item.created, expires=item.expires)

    async def _sign(self) -> SecretItem:
        started = time.monotonic()
        # The key is made, and the signed chain checked, by a worker process (cryptography stays out of the agent).
        worker, self._key_ahead = self._key_ahead or KeyWorker(), None
        try:
            return await self._sign_with(worker, started)
        finally:
            await worker.close()

    async def _sign_with(self, worker: KeyWorker, started: float) -> SecretItem:
        assert self.ca is not None
        s = self.settings
        try:
            csr, key = await worker.generate_csr(s.identity, s.key_options)
        except pki.PkiError as exc:
            raise SecretError(f"failed to generate key and certificate for CSR: {exc}") from None
        self.metrics.outgoing_requests.labels("csr").inc()
        try:
            chain = await self.ca.sign(csr, s.ttl)
            certificate_chain = pki.concat_certs(chain)
            # A chain for another key (a broken CA) would be NACKed by Envoy and kept until the next rotation,
            # hours later: a failed CSR instead, retried with backoff.
            expires = await worker.check_issued(certificate_chain, key)
        except (CaError, pki.PkiError) as exc:
            self.metrics.failed_outgoing_requests.labels("csr").inc()
            self.ca_error = exc if isinstance(exc, CaError) else CaError(f"the CA's answer: {exc}")
            # Once per distinct failure: the pre-warm and Envoy's SDS retries repeat it every few seconds.
            if str(exc) != self._logged_ca_error:
                self._logged_ca_error = str(exc)
                log.error("%s failed to sign: %s", WORKLOAD, exc)
            else:
                log.debug("%s failed to sign: %s", WORKLOAD, exc)
            raise SecretError(f"failed to generate workload certificate: {exc}") from None
        self.ca_error = None
        self._logged_ca_error = ""
        self.issued = True
        item = SecretItem(
            WORKLOAD,
            certificate_chain=certificate_chain,
            private_key=key,
            root_cert=chain[-1].encode(),  # Citadel has no root endpoint: the chain's last certificate
            created=self.clock(),
            expires=expires,
        )
        log.info(
            "generated new workload certificate (latency %.0f ms, ttl %.0f s)",
            (time.monotonic() - started) * 1000,
            expires - self.clock(),
        )
        self._register(item)
        return item

    def _register(self, item: SecretItem) -> None:
        if self._workload is not None:
            return  # already scheduled (two requests raced)
        delay = rotation_delay(item, self.settings.grace_ratio, self.settings.grace_jitter, self.clock(), self.rand)
        if delay > 0:
            self._due_when_issued = 0
        else:
            # Issued already expired or inside its renewal grace (a CA or node clock off, a TTL of a second):
            # renewing at once would sign a key and call the CA in a loop (Istio does: one core and istiod
            # hammered by every pod). Back off as for a failed CSR instead.
            delay = min(PREWARM_FIRST_WAIT * 2**self._due_when_issued, PREWARM_MAX_WAIT)
            self._due_when_issued += 1
            log.error(
                "istiod's CA issued a certificate already due for renewal (valid until %s): check the CA's and this"
                " node's clocks; renewing in %.1fs",
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(item.expires)),
                delay,
            )
        self._workload = item
        self._rotation_at = self.clock() + delay
        self._rescheduled.set()
        self.metrics.cert_expiry.labels(WORKLOAD).set_function(lambda: item.expires - time.time())
        log.debug("scheduled certificate for rotation in %.1f s", delay)

    async def _rotate(self) -> None:
        """At each rotation time: forget the certificate and tell SDS, which asks for a new one."""
        while True:
            self._rescheduled.clear()
            item, at = self._workload, self._rotation_at
            if item is None or at is None:
                await self._rescheduled.wait()
                continue
            try:
                async with asyncio.timeout(max(at - self.clock(), 0.0)):
                    await self._rescheduled.wait()
                continue  # rescheduled: look again
            except TimeoutError:
                pass
            if self._workload is item:
                log.info("rotating certificate")
                self._workload = None
                self._rotation_at = None
                self.on_update(WORKLOAD)

    # -- long-running ----------------------------------------------------------------------------------------

    async def run(self, *, prewarm: bool, prewarm_first_wait: float = PREWARM_FIRST_WAIT) -> None:
        """The file watcher and the rotation timer; with `prewarm`, first `default` then `ROOTCA` is fetched (with
        backoff, until it works) so OUTPUT_CERTS is written and Envoy's first request is answered from the cache.
        Exit paths: only cancellation."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.watcher.run())
            tg.create_task(self._rotate())
            if prewarm:
                tg.create_task(self.prewarm(prewarm_first_wait))

    async def prewarm(self, wait: float = PREWARM_FIRST_WAIT) -> None:
        """Fetch `default` then `ROOTCA`, retrying with backoff until both are there (Istio's newSDSService)."""
        for name in (WORKLOAD, ROOT):
            while True:
                try:
                    await self.generate(name)
                    break
                except SecretError as exc:
                    log.debug("failed to warm certificate %s: %s", name, exc)
                await asyncio.sleep(wait * self.rand.uniform(0.5, 1.5))
                wait = min(wait * 2, PREWARM_MAX_WAIT)
        self.warmed.set()

    def _output(self, item: SecretItem) -> None:
        out = self.settings.output_dir
        if not out:
            return
        for file_name, data in (
            ("key.pem", item.private_key),
            ("cert-chain.pem", item.certificate_chain),
            ("root-cert.pem", item.root_cert),
        ):
            if not data:
                continue
            path = Path(out) / file_name
            try:
                if path.exists() and path.read_bytes() == data:
                    continue
                write_atomic(path, data, mode=self.settings.output_mode)
            except OSError as exc:
                log.error("error when output the resource %s to %s: %s", item.name, path, exc)

    async def _drop_key_ahead(self) -> None:
        worker, self._key_ahead = self._key_ahead, None
        if worker is not None:
            await worker.close()

    async def close(self) -> None:
        await self._drop_key_ahead()
        if self.ca is not None:
            await self.ca.close()
