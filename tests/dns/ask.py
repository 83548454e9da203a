"""Sends raw DNS queries and prints the raw replies, for tests that must ask from inside a network namespace.

    python -m tests.dns.ask QUERIES.json     # [[host, port, "udp"|"tcp", hex], ...] -> JSON [hex or null, ...]

Each query gets its own socket; null means no reply within TIMEOUT_S (over TCP: the connection closed or timed out).
The queries to each (host, port) run in order, those to different servers side by side.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TIMEOUT_S = 1.0


def ask(host: str, port: int, protocol: str, wire: bytes) -> bytes | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if protocol == "udp":
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(TIMEOUT_S)
                sock.connect((host, port))
                sock.send(wire)
                return sock.recv(65535)
        with socket.create_connection((host, port), timeout=TIMEOUT_S) as sock:
            sock.sendall(struct.pack("!H", len(wire)) + wire)
            head = _read(sock, 2)
            return _read(sock, struct.unpack("!H", head)[0])
    except (TimeoutError, ConnectionError, EOFError):
        return None


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def main(path: str) -> None:
    queries = [(str(h), int(p), str(proto), bytes.fromhex(w)) for h, p, proto, w in json.loads(Path(path).read_text())]
    by_server: dict[tuple[str, int], list[int]] = {}
    for index, (host, port, _, _) in enumerate(queries):
        by_server.setdefault((host, port), []).append(index)
    replies: list[bytes | None] = [None] * len(queries)

    def run(indexes: list[int]) -> None:
        for i in indexes:
            replies[i] = ask(*queries[i])

    with ThreadPoolExecutor(max_workers=max(1, len(by_server))) as pool:
        list(pool.map(run, by_server.values()))
    print(json.dumps([None if r is None else r.hex() for r in replies]))


if __name__ == "__main__":
    main(sys.argv[1])
