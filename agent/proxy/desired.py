"""What Envoy should run: the rendered bootstrap and the content hash of every file Envoy reads itself."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio


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
    """desired_state() on a daemon thread of its own. A render runs the operator's template and reads files: one
    that never returns (a template looping for ever, a hung mount) must not keep the agent from stopping. Awaiting
    this can be cancelled (the thread is left to finish on its own), and the interpreter's exit does not wait for
    the thread, where asyncio's default executor (asyncio.to_thread) would join it for ever."""
    import asyncio  # noqa: PLC0415 (`pilot-agent proxy` renders and execs epoch 0 before it loads the event loop)

    loop = asyncio.get_running_loop()
    done: asyncio.Future[DesiredState] = loop.create_future()

    def settle(result: DesiredState | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            assert result is not None
            done.set_result(result)

    def work() -> None:
        result: DesiredState | None = None
        error: BaseException | None = None
        try:
            result = desired_state()
        except BaseException as exc:  # handed to the awaiting task, which decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name="render", daemon=True).start()
    return await done
