"""The key worker's process (agent.security.key_worker starts it): one JSON request per line on stdin, one JSON
answer per line on stdout, until stdin closes. Light imports on purpose: the worker's start is on the way to the
first certificate.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from agent.errors import describe_error
from agent.security import pki
from agent.security.settings import KeyOptions


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """The worker's side of one request (pure but for the key's randomness)."""
    try:
        if "csr" in request:
            csr, key = pki.generate_csr(request["csr"]["identity"], KeyOptions(**request["csr"]["options"]))
            return {"csr": csr.decode(), "key": key.decode()}
        chain, key = request["check"]["chain"].encode(), request["check"]["key"].encode()
        pki.check_key_pair(chain, key, own_key=True)  # the key this worker made
        return {"not_after": pki.not_after(chain).timestamp()}
    except pki.PkiError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # cryptography's own errors: a failed CSR (retried), never a dead agent
        return {"error": describe_error(exc)}


def main() -> None:
    for line in sys.stdin:
        sys.stdout.write(json.dumps(answer(json.loads(line))) + "\n")
        sys.stdout.flush()
    # stdin closed: the agent is done with this worker and waits for its exit, with the new certificate not yet
    # served. Nothing is left to flush or release: skip the interpreter's teardown (cryptography's ~70 modules,
    # 20-50 ms).
    os._exit(0)


if __name__ == "__main__":
    main()
