"""Files the way kubelet writes them into downward-API, Secret, ConfigMap and projected volumes.

kubelet's AtomicWriter (kubernetes `pkg/volume/util/atomic_writer.go`) never edits a visible file in place. Each
version of the payload goes into a fresh hidden directory named after the UTC time, `..2026_11_29_19_04_05.<n>`;
the volume's visible entries are symlinks `labels -> ..data/labels`, and `..data` is itself a symlink to the current
timestamped directory. An update writes the new directory, points a temporary symlink `..data_tmp` at it, and
renames that over `..data` (rename is atomic), then removes what the payload dropped and the old directory. A reader
therefore sees the old version or the new one, never a mix, and an inotify watcher on the directory sees the
`..data` rename rather than a write to `labels` — which is why the agent must watch directories, not files.

Downward-API `metadata.labels` / `metadata.annotations` files hold one `key="value"` line per entry, sorted by key,
values quoted with Go's `%q`, no newline after the last line (`pkg/fieldpath` FormatMap).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = "..data"
NEW_DATA_DIR = "..data_tmp"
_MAX_FILE_NAME = 255
_MAX_PATH = 4096

_GO_SIMPLE_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _go_is_print(ch: str) -> bool:
    # Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space. (Python's own tables
    # are Unicode 14 on 3.11; a character added later would be escaped here and printed by Go: not in label values
    # anyone uses.)
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def go_quote(value: str) -> str:
    """Go's `fmt.Sprintf("%q", value)` (= strconv.Quote) for a valid UTF-8 string."""
    out = ['"']
    for ch in value:
        cp = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0xD800 <= cp <= 0xDFFF:
            # Not a Unicode scalar value: Kubernetes' JSON decoding already turned it into U+FFFD, which is printable.
            out.append("\ufffd")
        elif _go_is_print(ch):
            out.append(ch)
        elif ch in _GO_SIMPLE_ESCAPES:
            out.append(_GO_SIMPLE_ESCAPES[ch])
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\x{cp:02x}")
        elif cp < 0x10000:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    out.append('"')
    return "".join(out)


def format_map(entries: Mapping[str, str]) -> str:
    """kubelet's downward-API text for metadata.labels / metadata.annotations (fieldpath.FormatMap)."""
    return "\n".join(f"{key}={go_quote(entries[key])}" for key in sorted(entries))


@dataclass(frozen=True)
class FileProjection:
    data: bytes
    mode: int = 0o644
    # kubelet chowns projected files to the pod's fsUser when one applies (e.g. a token for a non-root container).
    uid: int | None = None
    gid: int | None = None


class PayloadError(ValueError):
    pass


def validate_path(path: str) -> None:
    """kubelet's validatePath: relative, no `..` element, nothing starting with `..` (reserved for the writer)."""
    if not path:
        raise PayloadError("empty path")
    if len(path) > _MAX_PATH:
        raise PayloadError(f"{path[:40]}...: path longer than {_MAX_PATH}")
    if path.startswith("/"):
        raise PayloadError(f"{path}: must be relative")
    if path.startswith(".."):
        raise PayloadError(f"{path}: must not start with '..'")
    for part in path.split("/"):
        if part == "..":
            raise PayloadError(f"{path}: must not contain '..'")
        if len(part) > _MAX_FILE_NAME:
            raise PayloadError(f"{path}: element longer than {_MAX_FILE_NAME}")


def _go_temp_suffix(rng: random.Random) -> str:
    # os.MkdirTemp appends a random uint32 in decimal to the pattern.
    return str(rng.getrandbits(32))


class AtomicWriter:
    """kubelet's AtomicWriter for one volume directory. `write()` returns whether anything changed on disk."""

    def __init__(
        self,
        target_dir: Path,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        before_swap: Callable[[Path], None] | None = None,
    ) -> None:
        self.target_dir = target_dir
        self._clock = clock
        self._rng = rng or random.Random()
        # A test hook: runs after the new timestamped directory and ..data_tmp exist, before the rename.
        self._before_swap = before_swap

    def current_dir(self) -> Path | None:
        """The timestamped directory `..data` points at, if any."""
        link = self.target_dir / DATA_DIR
        try:
            return self.target_dir / os.readlink(link)
        except FileNotFoundError:
            return None

    def write(self, payload: Mapping[str, FileProjection]) -> bool:
        # (1) validate the payload
        for path in payload:
            validate_path(path)
        self.target_dir.mkdir(parents=True, exist_ok=True)
        # (2) the current timestamped directory, from the ..data link
        old_ts = self.current_dir()
        # (3) what the new payload drops
        old_paths = _walk(old_ts) if old_ts is not None else set()
        to_remove = old_paths - _with_parents(payload)
        # (4) nothing to do when every file is already there with the same content
        if old_ts is not None and not to_remove and _same(old_ts, payload):
            return False
        # (5) a new timestamped directory
        ts_dir = self._new_timestamp_dir()
        # (6) the payload goes into it
        try:
            for rel, projection in payload.items():
                full = ts_dir / rel
                full.parent.mkdir(parents=True, exist_ok=True)
                full.write_bytes(projection.data)
                os.chmod(full, projection.mode)
                if projection.uid is not None or projection.gid is not None:
                    os.chown(
                        full,
                        -1 if projection.uid is None else projection.uid,
                        -1 if projection.gid is None else projection.gid,
                    )
        except BaseException:
            shutil.rmtree(ts_dir, ignore_errors=True)
            raise
        # (7) the user-visible symlinks, one per top-level element: `labels -> ..data/labels`
        for top in sorted({rel.split("/", 1)[0] for rel in payload}):
            visible = self.target_dir / top
            if not os.path.lexists(visible):
                os.symlink(os.path.join(DATA_DIR, top), visible)
        # (8) ..data_tmp -> the new directory (relative, like kubelet), (9) renamed over ..data
        tmp_link = self.target_dir / NEW_DATA_DIR
        if os.path.lexists(tmp_link):
            os.remove(tmp_link)  # left over by a writer that died between (8) and (9)
        os.symlink(ts_dir.name, tmp_link)
        if self._before_swap is not None:
            self._before_swap(ts_dir)
        os.rename(tmp_link, self.target_dir / DATA_DIR)
        # (10) visible links for top-level entries the payload dropped, (11) the old directory
        for rel in to_remove:
            if "/" not in rel:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.target_dir / rel)
        if old_ts is not None:
            shutil.rmtree(old_ts, ignore_errors=True)
        return True

    def _new_timestamp_dir(self) -> Path:
        prefix = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime(self._clock()))
        while True:
            candidate = self.target_dir / (prefix + _go_temp_suffix(self._rng))
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            os.chmod(candidate, 0o755)
            return candidate


def _walk(root: Path) -> set[str]:
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


def _with_parents(payload: Mapping[str, FileProjection]) -> set[str]:
    keep: set[str] = set()
    for rel in payload:
        parts = rel.split("/")
        keep.update("/".join(parts[: n + 1]) for n in range(len(parts)))
    return keep


def _same(ts_dir: Path, payload: Mapping[str, FileProjection]) -> bool:
    for rel, projection in payload.items():
        try:
            if (ts_dir / rel).read_bytes() != projection.data:
                return False
        except OSError:
            return False
    return True


def downward_api_payload(
    items: list[Mapping[str, object]],
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    fields: Mapping[str, str],
) -> dict[str, FileProjection]:
    """A downwardAPI volume's files from its `items` (fieldRef only; resourceFieldRef values come in `fields`)."""
    payload: dict[str, FileProjection] = {}
    for item in items:
        path = str(item["path"])
        mode = int(str(item.get("mode", 0o644)))
        field_ref = item.get("fieldRef")
        resource_ref = item.get("resourceFieldRef")
        if isinstance(field_ref, Mapping):
            field_path = str(field_ref["fieldPath"])
            if field_path == "metadata.labels":
                text = format_map(labels)
            elif field_path == "metadata.annotations":
                text = format_map(annotations)
            else:
                text = fields[field_path]
        elif isinstance(resource_ref, Mapping):
            text = fields[str(resource_ref["resource"])]
        else:
            raise PayloadError(f"{path}: neither fieldRef nor resourceFieldRef")
        payload[path] = FileProjection(text.encode(), mode)
    return payload
