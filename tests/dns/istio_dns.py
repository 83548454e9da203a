"""Istio's DNS proxy as a program of its own (tests/dns/istio_dns/main.go: Istio's pkg/dns/client, which its
pilot-agent runs), built with Go once per source content into the cache Istio's binaries use
(~/.cache/pilot-agent-py/istio/<version>/bin, or $PILOT_AGENT_PY_CACHE), and reused from there."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent / "istio_dns"
BUILD_TIMEOUT_S = 1800.0


def istio_version() -> str:
    """The Istio version go.mod pins (the same pin as the rest of the project's Istio comparisons)."""
    found = re.search(r"istio\.io/istio (\S+)", (SOURCE / "go.mod").read_text())
    assert found is not None
    return found.group(1)


def _go() -> str | None:
    return shutil.which("go") or next((p for p in ("/usr/local/go/bin/go",) if Path(p).exists()), None)


class IstioDnsUnavailable(Exception):
    """Go is missing or the build failed; the message says which."""


def istio_dns_binary() -> Path:
    """The built program; skips the test (a failure in CI for root/netns tests) when it cannot be built."""
    try:
        return build_istio_dns()
    except IstioDnsUnavailable as exc:
        pytest.skip(str(exc))


def build_istio_dns() -> Path:
    """The built program (built now if needed); IstioDnsUnavailable when Go is missing or the build fails."""
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        digest.update((SOURCE / name).read_bytes())
    base = os.environ.get("PILOT_AGENT_PY_CACHE") or str(Path.home() / ".cache" / "pilot-agent-py")
    bin_dir = Path(base) / "istio" / istio_version() / "bin"
    target = bin_dir / f"istio-dns-{digest.hexdigest()[:12]}"
    if target.exists():
        return target
    go = _go()
    if go is None:
        raise IstioDnsUnavailable("no Go toolchain (go on PATH or /usr/local/go/bin/go) to build Istio's DNS proxy")
    bin_dir.mkdir(parents=True, exist_ok=True)
    with (bin_dir / ".istio-dns.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        partial = target.with_suffix(".partial")
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false"}
        done = subprocess.run(
            [go, "build", "-o", str(partial), "."], cwd=SOURCE, env=env, capture_output=True, text=True,
            timeout=BUILD_TIMEOUT_S, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise IstioDnsUnavailable(f"building Istio's DNS proxy failed: {done.stderr.strip().splitlines()[-1:]}")
        partial.rename(target)
    return target
