"""Where Istio's golden files live: ../shared/conformance beside the checkout (never copied into the project)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_DIR = Path(os.environ.get("PILOT_AGENT_CONFORMANCE_DIR", REPO_ROOT.parent / "shared" / "conformance"))


def conformance_dir(kind: str) -> Path:
    """`kind` is "bootstrap" or "iptables". Skips (a failure in CI, see conftest) when the data is absent."""
    path = CONFORMANCE_DIR / kind
    if not path.is_dir():
        pytest.skip(f"conformance data not found at {path}")
    return path
