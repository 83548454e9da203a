"""`pilot-agent request`: stdout carries only the body; >399 except 404 and unreachable ports fail."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.commands.request import request
from agent.errors import ExitCode
from tests.support.envoy import free_port
from tests.support.http_server import QuietHandler, serving_http


class Handler(QuietHandler):
    received: list[tuple[str, str, bytes]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        Handler.received.append((self.command, self.path, self.rfile.read(length)))
        status = {"/missing": 404, "/broken": 503}.get(self.path, 200)
        body = b'{"ok": true}' if status == 200 else b"nope"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer


def test_prints_only_the_body_and_sends_method_and_body(capfd: pytest.CaptureFixture[str]) -> None:
    with serving_http(Handler) as port:  # stands in for Envoy's admin API
        assert request("POST", "drain_listeners?inboundonly", "payload", port=port) == ExitCode.OK
        assert capfd.readouterr().out == '{"ok": true}\n'
        assert Handler.received[-1] == ("POST", "/drain_listeners?inboundonly", b"payload")
        assert request("GET", "/missing", None, port=port) == ExitCode.OK  # Istio: 404 is not an error
        assert capfd.readouterr().out == "nope\n"
        assert request("GET", "broken", None, port=port) == ExitCode.REQUEST_FAILED
        captured = capfd.readouterr()
        assert captured.out == "nope\n"


def test_unreachable_port_fails_with_nothing_on_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    assert request("GET", "stats", None, port=free_port()) == ExitCode.REQUEST_FAILED
    assert capfd.readouterr().out == ""


def test_only_istio_ports_are_allowed() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "request", "--debug-port", "8080", "GET", "stats"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == ExitCode.CONFIG_ERROR
    assert result.stdout == ""
    assert "--debug-port: 8080 is not one of 15000, 15020, 15021, 15004" in result.stderr
