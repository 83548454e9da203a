"""What the agent's waits share: the first of several things to happen, the others cancelled; a blocking call run
off the event loop on a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

_T = TypeVar("_T")


async def first_of(*awaitables: Awaitable[object], timeout: float | None = None) -> bool:
    """Wait until the first of `awaitables` is done (True) or `timeout` seconds pass (False). The others are
    cancelled and awaited before this returns, so no task outlives the wait; an awaitable that failed raises."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return bool(done)


async def off_loop(call: Callable[[], _T], *, name: str) -> _T:
    """`call()` on a daemon thread of its own, which ends with it; what it returns or raises is the await's.

    For the agent's occasional blocking work (a render, imports, a /proc read once per epoch): asyncio's default
    executor (asyncio.to_thread) would keep its thread idle for the agent's whole life after the first use, and join
    it at exit, for ever if the call never returns (a template looping for ever, a hung mount). Awaiting this can be
    cancelled; the thread is then left to finish on its own, and the interpreter's exit does not wait for it."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle_result(result: _T) -> None:
        if not done.cancelled():
            done.set_result(result)

    def settle_error(error: BaseException) -> None:
        if not done.cancelled():
            done.set_exception(error)

    def work() -> None:
        try:
            result = call()
        except BaseException as exc:  # handed to the awaiting task, which decides
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle_error, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle_result, result)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await done
