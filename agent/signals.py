"""The signals the agent handles (agent/pid1.py dispatches them on the event loop), and a record of those that
arrive between epoch 0's exec and the event loop's handlers: `pilot-agent proxy` execs Envoy before it loads
asyncio, and a SIGTERM in that window must still drain and stop Envoy, not end the agent alone (Envoy runs in its
own process group: it would outlive the agent)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class SignalsBeforeTheLoop:
    """Installs recording handlers for HANDLED; `replay` hands what arrived, in order, to the loop's dispatcher.
    The event loop's own handlers (loop.add_signal_handler) replace these."""

    def __init__(self) -> None:
        self.received: list[int] = []
        for sig in HANDLED:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def replay(self, dispatch: Callable[[int], None]) -> None:
        received, self.received = self.received, []
        for sig in received:
            dispatch(sig)
