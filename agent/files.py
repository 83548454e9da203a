"""The agent's one way to write a file another process reads (Envoy: its bootstrap, a tracer token, certificates).

`write_atomic` writes a temp file in the target's directory, fsyncs it, renames it over the target and fsyncs the
directory: a reader sees the old file or the new one, never a part, and after a crash (node power loss) the rename
is not lost while the old contents are already gone. A failed write (disk full, quota, read-only) removes its temp
file: nothing is left behind but the previous file, untouched. Directories it creates are 0700: they hold the
bootstrap (node metadata, paths to keys) and secrets. A file the agent writes afresh at every start (Envoy's
bootstrap) skips the fsyncs (`durable=False`): atomic all the same, and an fsync on a busy node disk costs its
start tens of milliseconds for a file nobody reads after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from agent.errors import AgentError, ConfigError, ExitCode

log = logging.getLogger("agent.files")

# A write that fails for lack of room is the machine's problem (exit 73); any other (read-only, permissions, not a
# directory) is configPath pointing where the agent cannot write (exit 78).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically (see the module docstring); `durable` also fsyncs the file and its
    directory. Raises OSError naming `path` (its `filename`); then `path` is as it was."""
    make_private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            # write() and fsync() name no file: say which one the caller was writing.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    if durable:
        _fsync_directory(path.parent)


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and its missing ancestors 0700 (Path.mkdir(parents=True) gives the ancestors the default
    mode, 0755 with the usual umask: every level must be private). Existing directories keep their mode."""
    missing: list[Path] = []
    for level in (directory, *directory.parents):
        if level.is_dir():
            break
        if level.exists():  # a file where a directory must be: say so, not mkdir's "File exists"
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(level))
        missing.append(level)
    for level in reversed(missing):
        level.mkdir(mode=0o700, exist_ok=True)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # the rename is done; a directory we cannot open cannot be synced, and the write did not fail
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory (EINVAL): the rename stands
    finally:
        os.close(fd)


def remove_file(path: os.PathLike[str] | str) -> None:
    """Remove a file the agent wrote, if it is there. Another failure is a warning: cleanup never fails a caller."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)


def is_disk_error(exc: OSError) -> bool:
    return exc.errno in DISK_ERRNOS


def write_error(path: Path, exc: OSError) -> AgentError:
    """What a failed write under configPath means to the operator: the disk (73) or the configuration (78)."""
    why = exc.strerror or str(exc)
    if is_disk_error(exc):
        return AgentError(f"cannot write {path}: {why}", ExitCode.STARTUP_FAILED)
    return ConfigError("effective ProxyConfig", "configPath", f"cannot write {path}: {why}")


class NotARegularFile(OSError):
    """A FIFO or socket (or, when only regular files will do, a device) where a file was expected: not read."""


class FileTooLarge(OSError):
    """More than the reader's bound: not read further."""


def read_bounded(path: Path, limit: int, *, regular_only: bool = False) -> bytes:
    """The file's bytes, at most `limit` of them (FileTooLarge beyond). Never blocks: a FIFO or socket is refused
    (NotARegularFile) without a read, as it could make the reader wait for ever; `regular_only` refuses devices too
    (a symlink to /dev/zero). Other failures are the OSError of open/read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: open() of a FIFO waits otherwise
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (regular_only and not stat.S_ISREG(mode)):
            raise NotARegularFile(errno.EINVAL, "not a regular file", str(path))
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return bytes(data)


_watch_log = logging.getLogger("agent.watch")  # a watched file's trouble, under the watcher's scope
MAX_WATCHED_BYTES = 16 * 1024 * 1024


def content_hash(path: Path) -> str | None:
    """sha256 of the file's content (through symlinks), or None if it does not exist or cannot be read. Never
    blocks and reads at most MAX_WATCHED_BYTES: it runs on the event loop, and a FIFO put in a watched file's place
    would stop the whole agent (readiness, signals) for as long as nobody writes to it."""
    try:
        return hashlib.sha256(read_bounded(path, MAX_WATCHED_BYTES, regular_only=True)).hexdigest()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    except NotARegularFile:
        _watch_log.warning(
            "watched file %s is not a regular file: not read, Envoy keeps its current configuration", path
        )
        return None
    except OSError as exc:
        _watch_log.warning("cannot read watched file %s: %s", path, exc.strerror or exc)
        return None
