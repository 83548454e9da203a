"""kubelet's probe semantics, against a real local HTTP server whose answer the test switches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.http_server import QuietHandler, serving_http
from tests.support.probes import ContainerProbes, ProbeSpec, ProbeState, http_probe


def test_readiness_starts_failed_and_moves_only_at_thresholds() -> None:
    state = ProbeState(ProbeSpec("readiness", 15021, success_threshold=2, failure_threshold=3))
    assert state.result is False
    assert [state.record(ok) for ok in (True, True)] == [False, True]
    # Two failures are not enough, a success in between resets the count, three in a row flip it.
    assert [state.record(ok) for ok in (False, False, True, False, False, False)] == [
        True, True, True, True, True, False,
    ]  # fmt: skip
    assert state.record(True) is False
    assert state.record(True) is True


def test_startup_is_unknown_until_it_succeeds_and_liveness_starts_alive() -> None:
    startup = ProbeState(ProbeSpec("startup", 15021, failure_threshold=600))
    assert startup.result is None
    assert startup.record(False) is None
    assert startup.record(True) is True
    liveness = ProbeState(ProbeSpec("liveness", 15021, failure_threshold=2))
    assert liveness.result is True
    assert [liveness.record(False), liveness.record(False)] == [True, False]


def test_spec_from_manifest_takes_api_defaults_and_named_ports() -> None:
    spec = ProbeSpec.from_manifest("readiness", {"httpGet": {"path": "/healthz/ready", "port": 15021}})
    assert (spec.period_s, spec.timeout_s, spec.success_threshold, spec.failure_threshold) == (10, 1, 1, 3)
    named = ProbeSpec.from_manifest(
        "readiness", {"httpGet": {"port": "http-envoy-prom"}}, [{"name": "http-envoy-prom", "containerPort": 15090}]
    )
    assert named.port == 15090
    with pytest.raises(ValueError, match="httpGet"):
        ProbeSpec.from_manifest("readiness", {"exec": {"command": ["true"]}})


class _Switch:
    def __init__(self) -> None:
        self.status = 503
        self.delay = 0.0
        self.hits = 0
        self.lock = threading.Lock()


@contextmanager
def _server(switch: _Switch) -> Iterator[int]:
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            with switch.lock:
                switch.hits += 1
                status, delay = switch.status, switch.delay
            if delay:
                threading.Event().wait(delay)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serving_http(Handler, daemon_threads=True) as port:
        yield port


def test_http_probe_success_is_2xx_and_3xx_and_a_timeout_fails() -> None:
    switch = _Switch()
    with _server(switch) as port:
        url = f"http://127.0.0.1:{port}/healthz/ready"
        for status, ok in ((200, True), (302, True), (399, True), (404, False), (503, False)):
            switch.status = status
            assert http_probe(url, 1.0)[0] is ok, status
        switch.status, switch.delay = 200, 0.5
        ok, detail = http_probe(url, 0.1)
        assert not ok
        assert "timed out" in detail
    ok, detail = http_probe(url, 0.5)  # nothing listens any more
    assert not ok
    assert "refused" in detail.lower()


def test_startup_gates_readiness_and_failures_flip_it_after_the_threshold() -> None:
    switch = _Switch()
    with _server(switch) as port:
        period = 0.05
        probes = ContainerProbes(
            host="127.0.0.1",
            startup=ProbeSpec("startup", port, "/healthz/ready", period_s=period, timeout_s=1, failure_threshold=600),
            readiness=ProbeSpec("readiness", port, "/healthz/ready", period_s=period, timeout_s=1, failure_threshold=4),
        )
        with probes:
            assert probes.wait_for(lambda p: len(p.outcomes("startup")) >= 3, timeout=5)
            assert not probes.started
            assert not probes.ready
            assert probes.outcomes("readiness") == [], "readiness must not run before startup succeeds"
            switch.status = 200
            assert probes.wait_for(lambda p: p.ready, timeout=5)
            assert probes.started
            startup_count = len(probes.outcomes("startup"))
            # The server fails from now on: ready stays true for 3 failures and flips on the 4th.
            switch.status = 503
            assert probes.wait_for(lambda p: not p.ready, timeout=5)
            readiness = probes.outcomes("readiness")
            first_failure = next(i for i, o in enumerate(readiness) if not o.ok)
            flipped = next(i for i, o in enumerate(readiness) if o.result is False)
            assert flipped - first_failure == 3
            assert all(o.result is True for o in readiness[first_failure:flipped])
            assert len(probes.outcomes("startup")) == startup_count, "startup stops once it has succeeded"


def test_a_slow_probe_drops_ticks_instead_of_queueing_them() -> None:
    switch = _Switch()
    switch.status, switch.delay = 200, 0.25
    with _server(switch) as port:
        spec = ProbeSpec("readiness", port, period_s=0.05, timeout_s=1, failure_threshold=3)
        with ContainerProbes(host="127.0.0.1", readiness=spec) as probes:
            threading.Event().wait(1.0)
        # 1 s of 0.25 s probes: about 4, not the 20 a queue of 0.05 s ticks would give.
        assert 3 <= len(probes.outcomes("readiness")) <= 6
