"""Fixtures for the capture tests: a fresh pod/client namespace pair (root only)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.conftest import require_root
from tests.support.netns import PodNetwork, pod_network

INJECTOR_ARGS = (
    "istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
    "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020",
)  # fmt: skip


@pytest.fixture
def pod() -> Iterator[PodNetwork]:
    require_root()
    if not (shutil.which("ip") and shutil.which("iptables-restore")):
        pytest.skip("iproute2 and iptables are needed")
    with pod_network() as network:
        yield network


def add_foreign_rules(pod: PodNetwork) -> None:
    """Rules some other component owns, in every table we touch: they must survive every run untouched (and
    they make the tables exist, so before/after comparisons see real tables)."""
    for table in ("nat", "mangle", "raw"):
        done = pod.run(["iptables", "-t", table, "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN"])
        assert done.returncode == 0, done.stderr
