"""Fixtures of the log tests: the real agent as a subprocess (tests/supervisor/agent_process.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.supervisor.agent_process import StartAgent, agents


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[StartAgent]:
    yield from agents(tmp_path)
