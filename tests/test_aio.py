"""agent.aio.off_loop: blocking work on a thread that ends with it, so no idle pool thread outlives the call."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.aio import off_loop


def _named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


async def test_the_call_runs_off_the_loop_and_its_thread_ends_with_it() -> None:
    loop_thread = threading.get_ident()
    result = await off_loop(threading.get_ident, name="off-loop-test")
    assert result != loop_thread
    for thread in _named("off-loop-test"):
        thread.join(5)
    assert _named("off-loop-test") == []


async def test_an_error_of_the_call_is_raised_by_the_await() -> None:
    def fail() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        await off_loop(fail, name="off-loop-test")


async def test_a_call_that_never_returns_can_be_abandoned() -> None:
    release = threading.Event()
    waiting = asyncio.ensure_future(off_loop(release.wait, name="off-loop-stuck"))
    done, _ = await asyncio.wait([waiting], timeout=0.05)
    assert not done
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert all(t.daemon for t in _named("off-loop-stuck"))  # the interpreter's exit does not wait for it
    release.set()
