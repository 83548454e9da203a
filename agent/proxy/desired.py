"""What Envoy should run: the rendered bootstrap and the content hash of every file Envoy reads itself."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DesiredState:
    """The rendered bootstrap and the (path, sha256) of every file it depends on. Two states with the same digest
    run the same Envoy: a new epoch starts only when the digest changes."""

    bootstrap: bytes
    dependencies: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        h = hashlib.sha256(self.bootstrap)
        for path, content_hash in self.dependencies:
            h.update(f"\0{path}\0{content_hash}".encode())
        return h.hexdigest()


# Re-reads and re-renders every source. May raise anything (a ConfigError for bad input; an OSError for a full
# disk): the supervisor rejects the new configuration and the running Envoy keeps serving.
DesiredStateFn = Callable[[], DesiredState]


async def render_off_loop(desired_state: DesiredStateFn) -> DesiredState:
    """desired_state() on a daemon thread of its own (agent.aio.off_loop): a render runs the operator's template and
    reads files, and one that never returns (a template looping for ever, a hung mount) must not keep the agent from
    stopping."""
    from agent.aio import off_loop  # noqa: PLC0415 (`pilot-agent proxy` renders and execs epoch 0 before asyncio loads)

    return await off_loop(desired_state, name="render")
