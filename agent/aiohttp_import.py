"""aiohttp, imported without reading the system CA bundle: `import agent.aiohttp_import` before the first aiohttp
import of a long-running agent (`pilot-agent proxy` does, right after Envoy's exec).

aiohttp builds two default client `SSLContext`s when it is imported (aiohttp/connector.py), each loading the
system CA bundle: ~30 ms of OpenSSL parsing apiece on the critical path to readiness and ~1.9 MiB kept for good.
The agent never verifies a server with them: it talks to Envoy's admin port and the application over plain HTTP,
and its HTTPS application probes are unverified (`ssl=False`, as kubelet's). So OpenSSL is pointed at an empty
file (`SSL_CERT_FILE`, read by OpenSSL when a context loads its default paths) for the length of the import, and the
variable is put back as it was. The contexts keep the CA directory lookup (lazy, by hash), which costs nothing
until a certificate is verified. Code that verifies servers builds its own context (`ssl.create_default_context()`
after this import reads the bundle as usual). Nothing else runs on another thread during the import: the
agent's worker threads only render, validate and import tenacity/watchdog at that point.
"""

from __future__ import annotations

import os

_VARIABLE = "SSL_CERT_FILE"


def _import_without_ca_bundle() -> None:
    saved = os.environ.get(_VARIABLE)
    os.environ[_VARIABLE] = os.devnull
    try:
        import aiohttp.connector  # noqa: F401, PLC0415 (the import is the point)
    finally:
        if saved is None:
            del os.environ[_VARIABLE]
        else:
            os.environ[_VARIABLE] = saved


_import_without_ca_bundle()
