"""The CA client: a CSR to istiod's `istio.v1.auth.IstioCertificateService/CreateCertificate`.

Istio's security/pkg/nodeagent/caclient/providers/citadel/client.go with pkg/security/retry.go: up to 5 attempts on
the retryable codes, 100 ms doubling with 10% jitter between them; after a failed call the channel is rebuilt (the
next one reads the root, the client certificate and the token again). Headers: `clusterid`, CA_HEADER_*, the token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from agent.protos.istio_ca import CREATE_CERTIFICATE, IstioCertificateRequest, IstioCertificateResponse
from agent.security.credentials import CredentialsError, call_metadata, open_channel
from agent.security.metrics import SecurityMetrics
from agent.security.settings import UpstreamSettings

log = logging.getLogger("agent.security.ca")

ATTEMPTS = 5
FIRST_BACKOFF = 0.1
RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
    }
)
# One attempt's deadline; Istio sets none, but a CA that accepts the connection and never answers must not hold
# the certificate (and Envoy's start) forever.
CALL_TIMEOUT = 20.0


class CaError(Exception):
    """The CA did not issue a certificate. `code` is the gRPC status (None: not a gRPC failure). `refused` is
    True when the CA rejected the caller's credentials (UNAUTHENTICATED, PERMISSION_DENIED)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code

    @property
    def refused(self) -> bool:
        return self.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class CaClient:
    def __init__(
        self,
        upstream: UpstreamSettings,
        metrics: SecurityMetrics,
        *,
        cert_signer: str = "",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.cert_signer = cert_signer
        self.sleep = sleep
        self._channel: grpc.aio.Channel | None = None

    async def sign(self, csr_pem: bytes, ttl_seconds: int) -> list[str]:
        """The certificate chain for the CSR, leaf first, root last. Raises CaError."""
        request = IstioCertificateRequest(csr=csr_pem.decode(), validity_duration=ttl_seconds)
        # Always present, "" by default: istiod reads it to pick a signer (ISTIO_META_CERT_SIGNER).
        request.metadata.update({"CertSigner": self.cert_signer})
        payload = request.SerializeToString()

        def wait(state: RetryCallState) -> float:
            return float(FIRST_BACKOFF * 2 ** (state.attempt_number - 1) * random.uniform(0.9, 1.1))

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            log.warning("ca request failed (%s), starting attempt %d", error, state.attempt_number + 1)
            self.metrics.outgoing_retries.labels("csr").inc()

        retrying = AsyncRetrying(
            stop=stop_after_attempt(ATTEMPTS),
            wait=wait,
            retry=retry_if_exception(lambda exc: isinstance(exc, CaError) and exc.code in RETRYABLE),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await self._call(payload)
                except CaError:
                    await self._reconnect()
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _call(self, payload: bytes) -> list[str]:
        try:
            channel = self._channel_now()
        except CredentialsError as exc:
            raise CaError(f"CA {self.upstream.describe()}: {exc}") from None
        create = channel.unary_unary(CREATE_CERTIFICATE)
        started = time.monotonic()
        try:
            raw = await create(payload, metadata=call_metadata(self.upstream), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise CaError(f"create certificate: {code.name}: {exc.details()}", code) from None
        finally:
            self.metrics.outgoing_latency.labels("csr").inc((time.monotonic() - started) * 1000)
        chain = list(IstioCertificateResponse.FromString(raw).cert_chain)
        if len(chain) <= 1:
            raise CaError("invalid empty CertChain")
        return chain

    def _channel_now(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = open_channel(self.upstream)
        return self._channel

    async def _reconnect(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def close(self) -> None:
        await self._reconnect()
