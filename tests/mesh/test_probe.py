"""The mesh side's readiness probe: which side fails, until istiod answered and a certificate was issued; then
remembered (an istiod outage does not unready a configured Envoy) until Envoy restarts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from agent.mesh.service import MeshProbe
from agent.security.caclient import CaError
from agent.status.readiness import NotReady


def mesh(failure: str | None = None, answered: bool = False, issued: bool = False, ca_error: Any = None) -> Any:
    xds = SimpleNamespace(answered=answered, not_ready_reason=lambda: failure)
    cache = SimpleNamespace(issued=issued, ca_error=ca_error)
    ca = SimpleNamespace(describe=lambda: "istiod:15012 (TLS: root r.pem, server name istiod.istio-system.svc)")
    return SimpleNamespace(xds=xds, cache=cache, prewarm=True, settings=SimpleNamespace(ca=ca))


async def test_istiod_side_first_then_the_ca() -> None:
    state = mesh(failure="istiod unreachable: UNAVAILABLE: connection refused")
    probe = MeshProbe(state)
    with pytest.raises(NotReady, match=r"^istiod unreachable"):
        await probe.check()
    state.xds.not_ready_reason = lambda: None
    state.xds.answered = True
    state.cache.ca_error = CaError("create certificate: UNAUTHENTICATED: bad token", grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(NotReady, match=r"^istiod's CA refused the credentials: .*bad token .*server name istiod"):
        await probe.check()
    assert not probe.passed


async def test_no_opinion_until_both_then_remembered_until_forgotten() -> None:
    state = mesh(answered=True)
    probe = MeshProbe(state)
    await probe.check()  # nothing failed, but no certificate yet: Envoy's probes speak
    assert not probe.passed
    state.cache.issued = True
    await probe.check()
    assert probe.passed
    state.xds.not_ready_reason = lambda: "istiod unreachable: istiod restarting"
    await probe.check()  # remembered: a later outage does not count
    assert probe.passed
    probe.forget()  # Envoy restarted: it needs istiod again
    with pytest.raises(NotReady, match="istiod restarting"):
        await probe.check()
