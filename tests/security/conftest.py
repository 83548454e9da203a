"""Fixtures for the certificate side: a test mesh CA, a signer standing in for istiod's CA service (the gRPC
client itself is tested against a real gRPC server in test_caclient.py), short unix-socket directories."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.security.caclient import CaError
from tests.support.mesh_pki import MeshCa

IDENTITY = "spiffe://cluster.local/ns/fake-namespace/sa/fake-sa"


class StubSigner:
    """Signs with a MeshCa in-process. `fail_with` makes every call fail (a CA outage); `ttl` overrides the
    validity asked for (a CA that shortens lifetimes)."""

    def __init__(self, ca: MeshCa, identity: str = IDENTITY) -> None:
        self.ca = ca
        self.identity = identity
        self.calls = 0
        self.called = asyncio.Condition()
        self.fail_with: CaError | None = None
        self.ttl: int | None = None

    async def sign(self, csr_pem: bytes, ttl_seconds: int) -> list[str]:
        self.calls += 1
        async with self.called:
            self.called.notify_all()
        if self.fail_with is not None:
            raise self.fail_with
        return self.ca.issue(csr_pem, [self.identity], self.ttl or ttl_seconds)

    async def close(self) -> None:
        pass

    async def wait_for_calls(self, count: int) -> None:
        async with asyncio.timeout(10), self.called:
            await self.called.wait_for(lambda: self.calls >= count)


@pytest.fixture(scope="session")
def mesh_ca() -> MeshCa:
    return MeshCa()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths must fit in 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="mesh", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
