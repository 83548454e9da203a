"""Istio's DNS proxy as a program of its own (tests/dns/istio_dns/main.go: Istio's pkg/dns/client, which its
pilot-agent runs), built with Go once per source content into the cache of Istio's binaries
(tests/support/istio_build.py: the same pin, the same toolchain finder, the same directory) and reused from there."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.istio_build import ISTIO_VERSION, IstioUnavailable, bin_dir, go_binary

SOURCE = Path(__file__).resolve().parent / "istio_dns"
BUILD_TIMEOUT_S = 1800.0


class IstioDnsUnavailable(Exception):
    """Go is missing or the build failed; the message says which."""


def pinned_version() -> str:
    """The Istio version go.mod requires: must be the project's one pin (ISTIO_VERSION)."""
    found = re.search(r"istio\.io/istio (\S+)", (SOURCE / "go.mod").read_text())
    assert found is not None
    return found.group(1)


def istio_dns_binary() -> Path:
    """The built program; skips the test (a failure in CI for root/netns tests) when it cannot be built."""
    try:
        return build_istio_dns()
    except IstioDnsUnavailable as exc:
        pytest.skip(str(exc))


def build_istio_dns() -> Path:
    """The built program (built now if needed); IstioDnsUnavailable when Go is missing or the build fails."""
    if pinned_version() != ISTIO_VERSION:
        raise IstioDnsUnavailable(f"tests/dns/istio_dns/go.mod pins {pinned_version()}, the project {ISTIO_VERSION}")
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        digest.update((SOURCE / name).read_bytes())
    directory = bin_dir()
    target = directory / f"istio-dns-{digest.hexdigest()[:12]}"
    if target.exists():
        return target
    try:
        go = go_binary()
    except IstioUnavailable as exc:
        raise IstioDnsUnavailable(str(exc)) from None
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".istio-dns.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        partial = target.with_suffix(".partial")
        env = {"GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly -buildvcs=false"}
        done = subprocess.run(
            [go, "build", "-o", str(partial), "."], cwd=SOURCE, env={**os.environ, **env}, capture_output=True,
            text=True, timeout=BUILD_TIMEOUT_S, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise IstioDnsUnavailable(f"building Istio's DNS proxy failed: {done.stderr.strip().splitlines()[-1:]}")
        partial.rename(target)
    return target
