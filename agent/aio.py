"""What the agent's waits share: the first of several things to happen, the others cancelled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable


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
