"""A real threaded HTTP server on loopback for a test's request handler, stopped when the block ends."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that does not print a line per request to stderr (pytest would show it with every failure)."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serving_http(handler: type[BaseHTTPRequestHandler], port: int = 0, daemon_threads: bool = False) -> Iterator[int]:
    """Serve `handler` on 127.0.0.1:`port` (0: the kernel picks one) from a background thread; yield the port.

    daemon_threads=True: closing does not wait for requests still being answered (for handlers that sleep)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = daemon_threads
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with stopped_on_exit(server, thread) as bound:
        yield bound


@contextmanager
def stopped_on_exit(server: TCPServer, thread: threading.Thread) -> Iterator[int]:
    """Yield the port of a server already serving from `thread`; stop it, close it and join the thread after."""
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        # shutdown() returns once serve_forever has, so the thread is ending; the bound only guards a hang.
        thread.join(5)
