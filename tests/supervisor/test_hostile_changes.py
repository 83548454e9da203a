"""Files changed under a running agent by someone who means harm, or by mistake: the running Envoy keeps serving.

Each step waits for what the agent does about the change (a log line, a new epoch), never for a fixed time.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from agent.bootstrap.render import default_template_path
from tests.supervisor.agent_process import Agent, StartAgent, leftovers
from tests.support.envoy import free_port, http_get, wait_until

pytestmark = [pytest.mark.envoy]

ANNOTATIONS = Path("etc/istio/pod/annotations")


def swap(agent_dir: Path, make: object) -> None:
    """Replace the annotations file the way kubelet does (a rename), by what `make(tmp_path)` creates."""
    target = agent_dir / ANNOTATIONS
    tmp = target.with_name(".tmp")
    make(tmp)  # type: ignore[operator]
    os.replace(tmp, target)


def log_shows(agent: Agent, pattern: str, timeout: float = 15.0) -> None:
    wait_until(lambda: re.search(pattern, agent.stderr()) or agent.proc.poll() is not None, timeout)
    assert agent.proc.poll() is None, agent.stderr()[-3000:]
    assert re.search(pattern, agent.stderr()), agent.stderr()[-3000:]


def ready(agent: Agent, port: str) -> int:
    try:
        return http_get(f"http://127.0.0.1:{agent.ports[port]}/healthz/ready", timeout=2.0)[0]
    except OSError:
        return 0


def test_start_only_fields_changed_at_runtime_keep_envoy_reachable(start_agent: StartAgent) -> None:
    # The status port and the admin port belong to the running agent: an annotation that moves them applies at the
    # next start. Before, the new epoch's readiness listener (15021) pointed at a port nobody served (503 for good)
    # and a moved admin port lost the agent its Envoy (the healthy epoch was killed 20 s later).
    agent = start_agent(prepare=lambda work: (work / ANNOTATIONS).parent.mkdir(parents=True))
    wait_until(lambda: ready(agent, "envoy_status") == 200)
    work = agent.config_dir.parent
    moved = f'status.sidecar.istio.io/port="{free_port()}"\nproxy.istio.io/config="proxyAdminPort: {free_port()}"\n'
    swap(work, lambda tmp: tmp.write_text(moved))
    log_shows(agent, r"Envoy epoch 1 is LIVE")  # the annotations are node metadata: a new epoch all the same
    assert ready(agent, "envoy_status") == 200
    assert ready(agent, "status") == 200
    assert re.search(
        r"changed files set proxyAdminPort \d+, statusPort \d+: applies at the agent's next start", agent.stderr()
    )


def test_a_fifo_or_device_in_place_of_a_watched_file_does_not_hang_the_agent(start_agent: StartAgent) -> None:
    # The watcher used to read a changed file whole, on the event loop: a FIFO blocked the agent for good (no
    # readiness, no signals), a symlink to /dev/zero read until memory ran out.
    agent = start_agent(prepare=lambda work: (work / ANNOTATIONS).parent.mkdir(parents=True))
    wait_until(lambda: ready(agent, "status") == 200)
    swap(agent.config_dir.parent, os.mkfifo)
    log_shows(agent, r"watched file \S+annotations is not a regular file")
    assert ready(agent, "status") == 200
    swap(agent.config_dir.parent, lambda tmp: tmp.symlink_to("/dev/zero"))
    log_shows(agent, r"watched file \S+annotations is not a regular file.*\n(.*\n)*.*is not a regular file")
    assert ready(agent, "envoy_status") == 200


def test_a_template_that_never_finishes_rendering_does_not_stop_the_shutdown(start_agent: StartAgent) -> None:
    # The supervisor awaited the render of a changed template before it looked at anything else: SIGTERM was
    # logged and then nothing (no drain, Envoy not stopped, the agent waiting for its render thread for ever).
    template = default_template_path().read_text()

    def prepare(work: Path) -> None:
        (work / "tpl").mkdir()
        (work / "tpl/bootstrap.json.j2").write_text(template)

    agent = start_agent("--templateFile", "tpl/bootstrap.json.j2", "--log_output_level=proxy:debug", prepare=prepare)
    wait_until(lambda: ready(agent, "status") == 200)
    # Settled: the reconcile that follows epoch 0's start has rendered. (Swapped before that render, the endless
    # template is what the render reads, and no change is ever reconciled: this wait is not a sleep's guess.)
    log_shows(agent, r"reconcile step \(after a start\): unchanged")
    endless = "{% for i in range(10**12) %}{% endfor %}" + template
    (agent.config_dir.parent / "tpl/.new").write_text(endless)
    os.replace(agent.config_dir.parent / "tpl/.new", agent.config_dir.parent / "tpl/bootstrap.json.j2")
    log_shows(agent, r"files changed: \S+bootstrap.json.j2: reconciling")
    assert ready(agent, "envoy_status") == 200  # the running Envoy keeps serving meanwhile
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == 0, agent.stderr()[-3000:]
    assert "abandoned" in agent.stderr()
    assert leftovers(agent) == []
