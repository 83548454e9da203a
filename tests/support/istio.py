"""Istio's module and binaries as the tests use them (tests/support/istio_build.py does the work).

When either cannot be had, the test is skipped with istio_build's one-line reason; tests using these are marked
`istio` (or `conformance`), and in CI a skip of such a test is a failure (tests/conftest.py). Each is looked up once
per test session, so a missing toolchain costs one attempt, not one per test.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.support import istio_build


@functools.cache
def _module_dir() -> Path | istio_build.IstioUnavailable:
    try:
        return istio_build.module_dir()
    except istio_build.IstioUnavailable as exc:
        return exc


@functools.cache
def _binary(name: str) -> Path | istio_build.IstioUnavailable:
    try:
        return istio_build.istio_binary(name)
    except istio_build.IstioUnavailable as exc:
        return exc


def istio_source(relative: str) -> Path:
    """A path inside Istio's module at the pinned version (e.g. "pkg/bootstrap/testdata")."""
    found = _module_dir()
    if isinstance(found, istio_build.IstioUnavailable):
        pytest.skip(str(found))
    return found / relative


def istio_binary(name: str) -> Path:
    """Istio's own `pilot-agent` or `pilot-discovery` at the pinned version, built on first use."""
    found = _binary(name)
    if isinstance(found, istio_build.IstioUnavailable):
        pytest.skip(str(found))
    return found
