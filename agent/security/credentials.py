"""How the agent reaches istiod (xDS and CA): the channel's TLS, the bearer token, the headers.

Istio's pilot/pkg/grpc (TLSOptions, ClientOptions) and caclient/credentials.go. Files are read when a channel or a
call is made, never cached: the xDS proxy opens a channel per Envoy stream and the CA client one per failure, so a
changed root (ConfigMap update), token (projected volume refresh) or client certificate applies to the next one,
which is what Istio gets from re-reading them at each handshake and RPC.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import grpc
import grpc.aio

from agent.security.secrets import read_secret_file
from agent.security.settings import TlsSettings, UpstreamSettings, os_root_file

log = logging.getLogger("agent.security")

# Istio's keepalive.DefaultOption() and ClientOptions: ping every 30 s, give up 10 s later; no limit on what
# istiod may send (a full CDS push of a large mesh is tens of megabytes).
CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # A channel of its own connection: grpc otherwise shares connections between channels to the same target
    # (a global subchannel pool), and a new channel could ride an old connection to an istiod that has gone.
    ("grpc.use_local_subchannel_pool", 1),
)


class CredentialsError(Exception):
    """A file the channel needs is missing or unusable (the root, the client certificate)."""


def _read(path: str, what: str) -> bytes:
    try:
        return read_secret_file(path)
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _system_roots() -> bytes | None:
    """The OS bundle Go's x509.SystemCertPool would use; None: grpc's own bundled roots."""
    bundle = os_root_file()
    try:
        return Path(bundle).read_bytes() if bundle else None
    except OSError:
        return None


def _client_pair(tls: TlsSettings) -> tuple[bytes | None, bytes | None]:
    """Istio presents the client certificate only while it parses and is unexpired; otherwise none (the token
    may still authenticate)."""
    if not (tls.client_cert and tls.client_key):
        return None, None
    from agent.security import pki  # noqa: PLC0415 (cryptography loads only where a client certificate is used)

    try:
        chain = _read(tls.client_cert, "client certificate")
        key = _read(tls.client_key, "client key")
        if pki.not_after(chain) <= datetime.datetime.now(datetime.UTC):
            log.warning("client certificate %s expired, using the token instead", tls.client_cert)
            return None, None
        pki.check_key_pair(chain, key)
    except (CredentialsError, pki.PkiError) as exc:
        log.warning("cannot use the client certificate (%s), using the token instead", exc)
        return None, None
    return key, chain


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """Raises CredentialsError when the root file is missing or holds no certificate."""
    if tls.root_cert:
        root: bytes | None = _read(tls.root_cert, "root certificate")
        if b"-----BEGIN CERTIFICATE-----" not in (root or b""):
            raise CredentialsError(f"root certificate {tls.root_cert} holds no PEM certificate")
    else:
        root = _system_roots()
    key, chain = _client_pair(tls)
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)


def _options(upstream: UpstreamSettings) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = list(CLIENT_OPTIONS)
    if upstream.tls is not None and upstream.tls.server_name:
        options.append(("grpc.ssl_target_name_override", upstream.tls.server_name))
    return options


def open_channel(upstream: UpstreamSettings) -> grpc.aio.Channel:
    """A new asyncio channel (not yet connected). Raises CredentialsError."""
    if upstream.tls is None:
        return grpc.aio.insecure_channel(upstream.address, options=_options(upstream))
    return grpc.aio.secure_channel(upstream.address, channel_credentials(upstream.tls), options=_options(upstream))


def open_sync_channel(upstream: UpstreamSettings) -> grpc.Channel:
    """A new channel of grpc's synchronous API (not yet connected). Raises CredentialsError."""
    if upstream.tls is None:
        return grpc.insecure_channel(upstream.address, options=_options(upstream))
    return grpc.secure_channel(upstream.address, channel_credentials(upstream.tls), options=_options(upstream))


def call_metadata(upstream: UpstreamSettings) -> tuple[tuple[str, str], ...]:
    """The headers of one call: the configured ones and, if the token file can be read, the bearer token."""
    metadata = list(upstream.headers)
    if upstream.token_path:
        try:
            token = read_secret_file(upstream.token_path).decode(errors="replace").strip()
        except OSError as exc:
            log.debug("no token at %s: %s", upstream.token_path, exc)
            token = ""
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
    return tuple(metadata)
