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
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.files import content_hash

if TYPE_CHECKING:
    # `pilot-agent proxy` imports content_hash before it execs Envoy; watchdog loads when the watcher starts.
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers.api import BaseObserver

    from agent.metrics import AgentMetrics

log = logging.getLogger("agent.watch")


@dataclass(frozen=True)
class ChangeSet:
    changed: tuple[Path, ...]
    deleted: tuple[Path, ...]
    kinds: tuple[str, ...]


# Watched files are certificates, downward-API files, mesh config, templates: far below this. A larger one is not
# read (hashing runs on the event loop, and its reader would refuse it anyway: agent.config.documents).
def _handler(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Path]) -> FileSystemEventHandler:
    from watchdog.events import FileSystemEventHandler  # noqa: PLC0415 (lazy: see the TYPE_CHECKING imports)

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if event.event_type in ("opened", "closed_no_write"):
                return  # reads (our own hashing included) are not changes
            raw = event.src_path
            path = Path(raw.decode() if isinstance(raw, bytes) else raw)
            # Called on watchdog's thread: hand over to the loop, nothing else.
            loop.call_soon_threadsafe(queue.put_nowait, path.parent if not event.is_directory else path)

    return Handler()


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
        # While run() is watching: the observer, its handler and the directories scheduled on it (for add()).
        self._observer: BaseObserver | None = None
        self._handler: FileSystemEventHandler | None = None
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
        if self._observer is not None and self._handler is not None:
            try:
                self._schedule(self._observer, self._handler)
            except OSError as exc:
                log.warning(
                    "cannot watch more directories (%s): changes to %s are not seen", exc, ", ".join(map(str, files))
                )

    def _schedule(self, observer: BaseObserver, handler: FileSystemEventHandler) -> None:
        for directory in sorted(self.directories() - self._scheduled):
            if directory.is_dir():
                observer.schedule(handler, str(directory), recursive=False)
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
        """Exit paths: only cancellation (the observer thread is stopped and joined then)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Path] = asyncio.Queue()
        if not self.files:
            # Nothing to watch yet (the SDS cache adds files as Envoy asks for them, and with a CA, never): no
            # observer, so none of watchdog's threads, until add() brings some. Changes made meanwhile are caught
            # by the first check() below, against the contents add() recorded.
            self.ready.set()
            await self._added.wait()
        from watchdog.observers import Observer  # noqa: PLC0415 (lazy: see the TYPE_CHECKING imports)

        observer = Observer()
        handler = _handler(loop, queue)
        try:
            self._schedule(observer, handler)
            observer.start()
        except OSError as exc:
            # inotify instance or watch limits (per uid: every istio-proxy on a node runs as 1337) must not take a
            # healthy Envoy down: look at the files periodically instead.
            observer.unschedule_all()
            self._scheduled.clear()
            log.warning("file events unavailable (%s): checking watched files every %.0fs", exc, POLL_INTERVAL)
            await self._poll()
            return
        self._observer, self._handler = observer, handler
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
                        break
                    self._look_ahead(queue)
                self._changing = None
                self.check()
        finally:
            self._observer, self._handler = None, None
            observer.stop()
            with contextlib.suppress(RuntimeError):
                await asyncio.to_thread(observer.join, 5.0)

    def _look_ahead(self, queue: asyncio.Queue[Path]) -> None:
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
