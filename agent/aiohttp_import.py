"""aiohttp, imported without reading the system CA bundle: `import agent.aiohttp_import` before the first aiohttp
import of a long-running agent (`pilot-agent proxy` does, right after Envoy's exec).

aiohttp builds two default client `SSLContext`s when it is imported (aiohttp/connector.py), each loading the
system CA bundle: ~30 ms of OpenSSL parsing apiece on the critical path to readiness and ~1.9 MiB kept for good.
The agent never verifies a server with them: it talks to Envoy's admin port and the application over plain HTTP,
and its HTTPS application probes are unverified (`ssl=False`, as kubelet's). So for the length of the import
`ssl.SSLContext.set_default_verify_paths` (what `create_default_context()` and aiohttp call to load the bundle) does
nothing, and is put back after: aiohttp's two default contexts hold no CA at all, so a request verified with them
fails closed. Code that verifies servers builds its own context after this import (the bundle loads as usual; the
xDS proxy and the CA client use gRPC's own TLS). Only this interpreter's classes change, not the process
environment: C code on other threads (gRPC reads its environment) sees nothing of it.

`aiohttp.web` builds a `mimetypes.MimeTypes()` when it is imported (for file responses, which the agent never
serves), and the first one made in a process loads the system's type database (/etc/mime.types) into the
`mimetypes` module for good: ~0.4 MiB and a few ms for a table nobody reads. `mimetypes` loads that database itself
on its first use (`guess_type` and the others test for it), so it is marked loaded-on-use here and aiohttp's own
table, which never includes the system files, is the same as before.
"""

from __future__ import annotations

import mimetypes
import ssl


def _import_without_ca_bundle() -> None:
    context_class = ssl.SSLContext
    context_class.set_default_verify_paths = _no_default_paths  # type: ignore[method-assign]
    try:
        import aiohttp.connector  # noqa: F401, PLC0415 (the import is the point)
    finally:
        del context_class.set_default_verify_paths  # the C base class's method shows through again


def _no_default_paths(self: ssl.SSLContext) -> None:
    del self


def _system_mime_types_on_first_use() -> None:
    if getattr(mimetypes, "_db", None) is None:  # nothing has loaded the database yet
        mimetypes.inited = True  # MimeTypes() leaves it alone; mimetypes' functions load it when called


_import_without_ca_bundle()
_system_mime_types_on_first_use()
