"""Validate a change while the watcher's debounce window is still open.

A file change reaches the supervision policy only once its directories have been quiet for the debounce (100 ms by
default), and the hot restart it calls for validates the new bootstrap first (`envoy --mode validate`, 60-100 ms)
before it starts the new epoch. The validation need not wait for the window to close: as soon as the watcher sees
new contents, `ValidationAhead` renders the desired state and has Envoy judge it. When the policy then validates
exactly that state for exactly that epoch (same digest, same number), it takes the verdict judged ahead, or waits
for the judgement still running, instead of starting another. Contents that change again meanwhile are judged again
(one validation at a time, the newest contents next, never the same contents twice); a state the policy applies
that was not judged ahead is validated as before. A verdict only ever applies to the bytes it judged, so the
debounce keeps its purpose (a half-written file never restarts Envoy) and a bad configuration is still never
started.

Nothing judged ahead is logged above debug or counted: it may be a half-written state the window was there to wait
out. The policy logs and counts the verdict it uses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Set
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.proxy.desired import DesiredState, DesiredStateFn, render_off_loop
from agent.proxy.launcher import Launcher, Verdict

log = logging.getLogger("agent.proxy")

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]


class Target(NamedTuple):
    """What a hot restart would start now: its epoch number, and the digests not worth judging (the running state,
    a state already rejected)."""

    number: int
    skip: Set[str | None]


class _Judgement(NamedTuple):
    number: int
    digest: str
    verdict: asyncio.Future[Verdict]


@dataclass
class ValidationAhead:
    """`request()` when the watched files show new contents; `take()` from the policy's validation step.

    `target()` says what a hot restart would start now (None: nothing is worth judging ahead: no epoch, hot restart
    or validation off, shutting down); `forget(number)` removes an unused judgement's bootstrap file."""

    launcher: Launcher
    desired_state: DesiredStateFn
    spawn: Spawn
    target: Callable[[], Target | None]
    forget: Callable[[int], None]
    _wanted: bool = field(default=False, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _latest: _Judgement | None = field(default=None, init=False)

    def request(self) -> None:
        """New contents were seen: judge the desired state now, or after the judgement running now."""
        if self.target() is None:
            return
        self._wanted = True
        if self._task is None or self._task.done():
            try:
                self._task = self.spawn(self._judge())
            except RuntimeError:  # the TaskGroup is shutting down: there is nothing to restart any more
                self._wanted = False

    async def take(self, number: int, state: DesiredState) -> Verdict | None:
        """The verdict on exactly `state` as epoch `number`, judged ahead (waiting for it if it is being judged),
        or None: validate it now."""
        self._wanted = False
        latest, self._latest = self._latest, None
        if latest is None:
            return None
        if (latest.number, latest.digest) != (number, state.digest):
            await self._stop(latest)
            return None
        try:
            return await asyncio.shield(latest.verdict)
        except asyncio.CancelledError:
            if latest.verdict.cancelled():  # the judgement ended without a verdict: validate now
                return None
            raise

    async def cancel(self) -> None:
        """Stop judging and remove what an unused judgement wrote (the policy stops every epoch)."""
        self._wanted = False
        latest, self._latest = self._latest, None
        if latest is not None:
            await self._stop(latest)
        elif self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _stop(self, unused: _Judgement) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})
        self.forget(unused.number)

    async def _judge(self) -> None:
        """Exit paths: returns when no newer contents are waiting; cancelled by take() or cancel(). Never raises:
        this task belongs to the supervisor's TaskGroup, and nothing here may end the agent."""
        while self._wanted:
            self._wanted = False
            target = self.target()
            if target is None:
                return
            try:
                state = await render_off_loop(self.desired_state)
            except Exception as exc:
                log.debug("validation ahead: the new contents do not render (yet): %s", exc)
                continue
            if state.digest in target.skip:
                continue
            latest = self._latest
            if latest is not None and (latest.number, latest.digest) == (target.number, state.digest):
                # Another event for contents judged already (a rotation writes its files one by one, each an
                # event, and the first render may see them all): that verdict stands, no second validation.
                log.debug("validation ahead of epoch %d: contents judged already", target.number)
                continue
            judgement = _Judgement(target.number, state.digest, asyncio.get_running_loop().create_future())
            previous, self._latest = self._latest, judgement
            if previous is not None and previous.number != target.number:
                self.forget(previous.number)
            try:
                verdict = await self.launcher.validate(target.number, state)
            except asyncio.CancelledError:
                judgement.verdict.cancel()
                raise
            except Exception as exc:
                log.debug("validation ahead failed: %s", exc)
                judgement.verdict.cancel()
                continue
            judgement.verdict.set_result(verdict)
            log.debug("validation ahead of epoch %d: %s", target.number, "valid" if verdict.ok else verdict.summary)
