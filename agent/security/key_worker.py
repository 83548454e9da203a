"""The workload key, its CSR and the check of the chain the CA signed for it, in a short-lived worker process.

`cryptography` is what makes keys and parses certificates; loaded into the long-running agent it stays resident for
good (~10 MiB: its Rust extension with its own OpenSSL, ~70 modules; ~60 ms of import on the way to readiness),
for work done once at start and once per rotation. So the secret cache's CA path (agent.security.secret_cache)
runs that work here: one worker per issuance, started when the key is needed, kept while the CA signs, and ended
(stdin closed) once the chain is checked. The worker also makes the key on another core, off the event loop.

    /proc/self/exe -S -c <run agent.security.keygen> <roots>   # a JSON request per line in, an answer per line out

The agent's own interpreter through /proc/self/exe (a container's user may not be allowed to walk the path the
interpreter was started by), without site initialisation (-S: no .pth files, no editable install's import hook),
told where the agent and cryptography are by its arguments (`worker_command()`). Where no worker can run (it cannot be
started, or exits or hangs without answering), the work is done in the agent on a thread, as before the worker
existed, with one warning: a certificate is never refused for want of a worker.

Requests: `{"csr": {"identity": ..., "options": {KeyOptions fields}}}` -> `{"csr": PEM, "key": PEM}`;
`{"check": {"chain": PEM, "key": PEM}}` -> `{"not_after": POSIX seconds}` (the leaf's NotAfter, once the key is
known to be the leaf's). A PkiError is `{"error": message}`. The private key crosses a pipe between the agent and
its own child, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from agent.aio import off_loop
from agent.security import pki
from agent.security.settings import KeyOptions

log = logging.getLogger("agent.security")

# A worker that does not answer (a wedged interpreter) must not hold the certificate forever.
ANSWER_TIMEOUT = 30.0
# Bytes of one answer line: a key and a CSR, or a number (asyncio's default limit is 64 KiB).
LINE_LIMIT = 1 << 20


class _Unavailable(Exception):
    """No worker process can do the work (not started, gone, or not answering)."""


class KeyWorker:
    """The agent's side: started on the first request, ended by `close()` (idempotent). Raises pki.PkiError."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None
        self._pending: dict[str, Any] | None = None  # a request sent ahead, its answer not read yet
        self._in_agent = False  # no worker here: the work runs in the agent, on a thread

    async def request_csr(self, identity: str, options: KeyOptions) -> None:
        """Start the worker and ask for the key now; `generate_csr` with the same arguments takes the answer. The
        agent does this before Envoy's exec, so the key is made while the agent and Envoy start."""
        request = _csr_request(identity, options)
        try:
            await self._send(request)
            self._pending = request
        except _Unavailable as exc:
            await self._give_up(exc)

    async def generate_csr(self, identity: str, options: KeyOptions) -> tuple[bytes, bytes]:
        """pki.generate_csr, in the worker: (csr PEM, key PEM)."""
        request = _csr_request(identity, options)
        ahead, self._pending = self._pending, None
        if ahead is not None and ahead != request:
            with contextlib.suppress(_Unavailable):
                await self._receive()  # asked ahead for another identity: not this one
        answer = await self._ask(request, sent=ahead == request)
        return str(answer["csr"]).encode(), str(answer["key"]).encode()

    async def check_issued(self, chain_pem: bytes, key_pem: bytes) -> float:
        """pki.check_key_pair then pki.not_after, in the worker: the leaf's NotAfter as POSIX seconds."""
        answer = await self._ask({"check": {"chain": chain_pem.decode(), "key": key_pem.decode()}})
        return float(answer["not_after"])

    async def close(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def _ask(self, request: dict[str, Any], *, sent: bool = False) -> dict[str, Any]:
        answer: dict[str, Any] | None = None
        if not self._in_agent:
            try:
                if not sent:
                    await self._send(request)
                answer = await self._receive()
            except _Unavailable as exc:
                await self._give_up(exc)
        if answer is None:
            from agent.security.keygen import answer as answer_here  # noqa: PLC0415 (only without a worker)

            answer = await off_loop(functools.partial(answer_here, request), name="keygen")
        if "error" in answer:
            raise pki.PkiError(str(answer["error"]))
        return answer

    async def _send(self, request: dict[str, Any]) -> None:
        if self._process is None:
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *worker_command(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    # Read only when it fails: its last line goes into the warning, not a traceback into the log.
                    stderr=asyncio.subprocess.PIPE,
                    limit=LINE_LIMIT,
                    # Its own process group, as Envoy's: a Ctrl-C in a terminal reaches only the agent (which ends
                    # the worker by closing its stdin), not the worker too (a traceback, and the key made again).
                    process_group=0,
                )
            except OSError as exc:
                raise _Unavailable(f"cannot start {worker_command()[0]}: {exc.strerror or exc}") from None
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(json.dumps(request).encode() + b"\n")
            await self._process.stdin.drain()
        except OSError as exc:
            raise _Unavailable(f"it did not take the request: {exc.strerror or exc}") from None

    async def _receive(self) -> dict[str, Any]:
        process = self._process
        if process is None:
            raise _Unavailable("it is gone")
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), ANSWER_TIMEOUT)
        except (OSError, ValueError, TimeoutError) as exc:
            raise _Unavailable(f"it did not answer: {exc or type(exc).__name__}") from None
        if not line:
            await process.wait()
            raise _Unavailable(f"it exited with status {process.returncode}{await _last_words(process)}")
        try:
            answer: dict[str, Any] = json.loads(line)
        except ValueError:
            raise _Unavailable(f"it answered {line[:80]!r}, not JSON") from None
        return answer

    async def _give_up(self, why: _Unavailable) -> None:
        log.warning("key worker unavailable (%s): making the key and checking the certificate in the agent", why)
        self._in_agent = True
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def ask_key_ahead(identity: str, options: KeyOptions) -> KeyWorker | None:
    """A worker already making the key for `identity`, so that it is made on another core while the agent and Envoy
    start (the secret cache's first CSR takes it). None on any failure: the cache then starts its own worker and
    reports the error."""
    worker = KeyWorker()
    try:
        await worker.request_csr(identity, options)
    except pki.PkiError:
        await worker.close()
        return None
    return worker


async def _last_words(process: asyncio.subprocess.Process) -> str:
    """`: <the last line the exited worker wrote to stderr>` (a traceback's last line says what failed), or ""."""
    if process.stderr is None:
        return ""
    try:
        text = await asyncio.wait_for(process.stderr.read(), 1.0)  # to EOF: it has exited
    except (OSError, ValueError, TimeoutError):
        return ""
    lines = [line.strip() for line in text.decode("utf-8", "replace").splitlines() if line.strip()]
    return f": {lines[-1][:300]}" if lines else ""


def _csr_request(identity: str, options: KeyOptions) -> dict[str, Any]:
    return {"csr": {"identity": identity, "options": dataclasses.asdict(options)}}


# The worker's entry: the search roots come as arguments (ahead of sys.path, which still has PYTHONPATH's entries);
# the process environment is inherited untouched.
_ENTRY = (
    "import runpy, sys; sys.path[:0] = sys.argv[1:]; del sys.argv[1:]; "
    "runpy.run_module('agent.security.keygen', run_name='__main__', alter_sys=True)"
)


def worker_command() -> list[str]:
    """The agent's own interpreter (see the module's docstring), without site initialisation, told where the agent
    package and cryptography (with its cffi backend) are. Found without importing cryptography."""
    agent_root = Path(__file__).resolve().parents[2]
    spec = importlib.util.find_spec("cryptography")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    roots = dict.fromkeys([str(agent_root), *(str(Path(location).parent) for location in locations)])
    return ["/proc/self/exe", "-S", "-c", _ENTRY, *roots]
