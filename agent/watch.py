"""Watch files for real content changes. Knows nothing about Envoy: it only answers "what changed?".

Directories are watched, not files: Kubernetes updates a secret or ConfigMap volume by writing a new timestamped
directory and renaming the `..data` symlink onto it, so the watched file's own inode never sees an event. Any
event in a watched directory starts (or extends) a debounce window; when the directories have been quiet for
`debounce` seconds, or at the latest `max_delay` after the first event (a directory with a writer every few ms
never goes quiet, and must not postpone a certificate rotation for ever), every watched file is hashed, and only
files whose content hash differs from the last one seen are reported. A half-written file is caught by the
debounce (writers that go quiet mid-file are caught by the validation that follows). A deleted file is reported as
such: a warning, and the caller keeps its current state.

While a window is open the watcher also says, through `on_changing`, when the files' contents differ from the last
ones reported (and from the last ones it said this about): the caller may start work that depends only on those
contents (the supervisor validates the new bootstrap ahead), never act on them; only the report counts.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.files import content_hash

if TYPE_CHECKING:
    from agent.metrics import AgentMetrics

log = logging.getLogger("agent.watch")


@dataclass(frozen=True)
class ChangeSet:
    changed: tuple[Path, ...]
    deleted: tuple[Path, ...]
    kinds: tuple[str, ...]


class _DirectoryEvents:
    """inotify on the event loop, through watchdog's inotify bindings: one inotify instance, one watch per directory,
    and `on_event()` called on the loop when any of them has events. No thread: watchdog's Observer runs one to
    dispatch, one to read inotify and one per directory, and nothing here needs them (which event it was is not
    asked: every event only opens or extends a debounce window, and the files are hashed after it).

    The kernel is asked for the events watchdog's inotify observer asks for, less the reads (opened, closed without
    writing: our own hashing among them), with its flag not to follow a symlink named as the directory. The
    kernel's own events (a watch removed with its directory, a queue overflow) count as events too: the files are
    hashed again. OSError (the per-uid limits on inotify instances and watches) is the caller's to handle."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[], None]) -> None:
        # Lazy: watchdog loads when watching starts, after Envoy's exec.
        from watchdog.utils import UnsupportedLibcError  # noqa: PLC0415

        try:
            from watchdog.observers.inotify_c import InotifyConstants as C  # noqa: PLC0415
            from watchdog.observers.inotify_c import inotify_add_watch, inotify_init  # noqa: PLC0415
        except (ImportError, UnsupportedLibcError) as exc:  # not Linux: the caller polls
            raise OSError(f"no inotify here: {exc}") from None

        self._mask = (
            C.IN_MODIFY | C.IN_ATTRIB | C.IN_CLOSE_WRITE | C.IN_MOVED_FROM | C.IN_MOVED_TO | C.IN_CREATE
            | C.IN_DELETE | C.IN_DELETE_SELF | C.IN_DONT_FOLLOW
        )  # fmt: skip
        self._add_watch = inotify_add_watch
        fd = inotify_init()
        if fd < 0:
            raise _errno_error("inotify_init")
        os.set_inheritable(fd, False)  # Envoy and the validations do not get it
        os.set_blocking(fd, False)
        self._fd = fd
        self._loop = loop
        self._on_event = on_event
        loop.add_reader(fd, self._read)

    def watch(self, directory: Path) -> None:
        if self._add_watch(self._fd, os.fsencode(directory), self._mask) < 0:
            raise _errno_error(f"inotify_add_watch {directory}")

    def _read(self) -> None:
        self.drain()  # all that is queued: one look for events that arrived together
        self._on_event()

    def drain(self) -> bool:
        """Read what the kernel has queued, without waiting: True if there was anything."""
        queued = False
        try:
            while os.read(self._fd, 65536):
                queued = True
        except BlockingIOError:
            pass
        return queued

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)  # the kernel removes the watches with the instance


def _errno_error(call: str) -> OSError:
    number = ctypes.get_errno()
    return OSError(number, f"{call}: {os.strerror(number)}")


# Seconds between looks at the watched files when the kernel cannot deliver file events.
POLL_INTERVAL = 2.0


class Watcher:
    """Watches `files` ({path: kind}); calls `on_change(ChangeSet)` on the loop after each real change."""

    def __init__(
        self,
        files: Mapping[Path, str],
        on_change: Callable[[ChangeSet], None],
        *,
        metrics: AgentMetrics | None = None,
        debounce: float = 0.1,
        max_delay: float | None = None,
        on_changing: Callable[[], None] | None = None,
        missing_dir_level: int = logging.WARNING,
        change_level: int | None = None,
    ) -> None:
        """`missing_dir_level`: how loudly to say a watched file's directory does not exist (nothing will be seen
        there until the agent restarts): a warning, or debug where that is the normal case (no control plane).
        `change_level`: the level of the lines about a changed or deleted file (default: info and warning), debug
        where `on_change` reports each change itself."""
        self.files = {Path(p).absolute(): kind for p, kind in files.items()}
        self.missing_dir_level = missing_dir_level
        self.change_level = change_level
        self.on_change = on_change
        self.on_changing = on_changing
        # The contents `on_changing` was last called for, while a window is open.
        self._changing: dict[Path, str | None] | None = None
        self.metrics = metrics
        self.debounce = debounce
        self.max_delay = max(1.0, 10 * debounce) if max_delay is None else max(max_delay, debounce)
        self.hashes: dict[Path, str | None] = {p: content_hash(p) for p in self.files}
        self.ready = asyncio.Event()
        # Set by add(): run() starts watching only once there is something to watch.
        self._added = asyncio.Event()
        # While run() is watching: its inotify instance and the directories watched on it (for add()).
        self._events: _DirectoryEvents | None = None
        self._scheduled: set[Path] = set()

    def add(self, files: Mapping[Path, str]) -> None:
        """Watch more files from now on; their contents now are the baseline. Files already watched are ignored.
        (The SDS secret cache adds the files Envoy asks for by name while the agent runs.)"""
        for raw, kind in files.items():
            path = Path(raw).absolute()
            if path not in self.files:
                self.files[path] = kind
                self.hashes[path] = content_hash(path)
                self._added.set()
        if self._events is not None:
            try:
                self._schedule(self._events)
            except OSError as exc:
                log.warning(
                    "cannot watch more directories (%s): changes to %s are not seen", exc, ", ".join(map(str, files))
                )

    def _schedule(self, events: _DirectoryEvents) -> None:
        for directory in sorted(self.directories() - self._scheduled):
            if directory.is_dir():
                events.watch(directory)
                self._scheduled.add(directory)
            else:
                log.log(self.missing_dir_level, "not watching %s: directory does not exist", directory)

    def directories(self) -> set[Path]:
        """Each file's directory, and the directory above any symlinked ancestor: in a Kubernetes volume an item
        with a nested path (`certs/cert.pem`) lives under `certs -> ..data/certs`, and a swap of `..data` shows up
        only as events in the volume's top directory, not in `certs` itself."""
        directories: set[Path] = set()
        for path in self.files:
            directories.add(path.parent)
            directories.update(a.parent for a in (path.parent, *path.parent.parents) if a.is_symlink())
        return directories

    async def run(self) -> None:
        """Exit paths: only cancellation (the inotify instance is closed then)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[None] = asyncio.Queue()
        if not self.files:
            # Nothing to watch yet (the SDS cache adds files as Envoy asks for them, and with a CA, never): no
            # inotify instance until add() brings some. Changes made meanwhile are caught by the first check()
            # below, against the contents add() recorded.
            self.ready.set()
            await self._added.wait()
        events = None
        try:
            events = _DirectoryEvents(loop, functools.partial(queue.put_nowait, None))
            self._schedule(events)
        except OSError as exc:
            # inotify instance or watch limits (per uid: every istio-proxy on a node runs as 1337) must not take a
            # healthy Envoy down: look at the files periodically instead.
            if events is not None:
                events.close()
            self._scheduled.clear()
            log.warning("file events unavailable (%s): checking watched files every %.0fs", exc, POLL_INTERVAL)
            await self._poll()
            return
        self._events = events
        try:
            # Hash again now that events are flowing, so nothing changed between __init__ and here is missed.
            self.check()
            self.ready.set()
            while True:
                await queue.get()
                self._look_ahead(queue)
                # Debounce: wait until no event arrived for `debounce` seconds, or max_delay after the first one.
                deadline = loop.time() + self.max_delay
                while (quiet := min(self.debounce, deadline - loop.time())) > 0:
                    try:
                        async with asyncio.timeout(quiet):
                            await queue.get()
                    except TimeoutError:
                        # The window measures the writer's quiet, not the loop's: when the agent was held past it (a
                        # busy loop, a loaded machine), events that came meanwhile, read or still in the kernel,
                        # keep it open.
                        if queue.empty() and not events.drain():
                            break
                    self._look_ahead(queue)
                self._changing = None
                self.check()
        finally:
            self._events = None
            events.close()

    def _look_ahead(self, queue: asyncio.Queue[None]) -> None:
        """Within a window, after each batch of events: call on_changing when the contents are new."""
        while not queue.empty():  # events that arrived together: one look for all of them
            queue.get_nowait()
        if self.on_changing is None:
            return
        contents = {path: content_hash(path) for path in self.files}
        if contents not in (self.hashes, self._changing):
            self._changing = contents
            self.on_changing()

    async def _poll(self) -> None:
        self.check()
        self.ready.set()
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            self.check()

    def check(self) -> ChangeSet | None:
        """Hash every watched file; report those whose content changed since the last look."""
        changed: list[Path] = []
        deleted: list[Path] = []
        for path, old in self.hashes.items():
            new = content_hash(path)
            if new == old:
                continue
            self.hashes[path] = new
            if new is None:
                deleted.append(path)
                level = logging.WARNING if self.change_level is None else self.change_level
                log.log(level, "watched file %s was deleted: Envoy keeps its current configuration", path)
            else:
                changed.append(path)
                log.log(
                    logging.INFO if self.change_level is None else self.change_level, "watched file %s changed", path
                )
            if self.metrics is not None:
                self.metrics.file_changes.labels(self.files[path]).inc()
        if not changed and not deleted:
            log.debug("watched files hashed: no change")
            return None
        changes = ChangeSet(tuple(changed), tuple(deleted), tuple(sorted({self.files[p] for p in changed + deleted})))
        self.on_change(changes)
        return changes
