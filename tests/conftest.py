"""Suite-wide rules.

In CI (CI=true) a skipped test that needs root, network namespaces, a real Envoy, Istio's goldens or binaries, or the
built image is a failure: those are the tests that prove the agent works, and a machine that cannot run them must not
pass.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator

import pytest

MUST_RUN_IN_CI = {"envoy", "root", "netns", "conformance", "container", "istio"}


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A test that runs the CLI in-process (`agent.cli.main`) configures logging as the agent does: a root handler on
    the sys.stderr of that moment, pytest's capture, which is closed after the test. Left in place, every later
    warning from any test printed '--- Logging error ---' and a traceback to the real stderr."""
    root, agent = logging.getLogger(), logging.getLogger("agent")
    handlers, levels = root.handlers[:], (root.level, agent.level)
    yield
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    agent.setLevel(levels[1])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # An expected failure (xfail) is reported as skipped too, but it ran: only real skips fail in CI.
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return report
    markers = {mark.name for mark in item.iter_markers()} & MUST_RUN_IN_CI
    if markers:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped in CI, which must run every {'/'.join(sorted(markers))} test: {reason}"
    return report


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
