"""Service-account JWTs for a mesh without Kubernetes, and the JWKS that verifies them (the CA itself is
tests/support/mesh_pki.py's `MeshCa`).

- `JwtIssuer`: RS256 tokens shaped like Kubernetes projected service-account tokens (`sub:
  system:serviceaccount:<ns>:<sa>`, `aud` a list, `exp`), which istiod's `JWT_RULE` authenticator accepts
  (security/pkg/server/ca/authenticate/oidc.go), and `serving_jwks()`, an HTTP server for its JWKS.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.probes import enter_netns

ISTIO_CA_AUDIENCE = "istio-ca"


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
