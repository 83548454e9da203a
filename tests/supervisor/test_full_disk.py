"""A full disk under configPath while Envoy runs, with the real agent and a real Envoy: nothing dies, nothing is left.

configPath lives on a tmpfs of 1 MiB the test mounts (root), filled once Envoy is ready. A hot restart (SIGHUP) then
cannot write `envoy-rev1.json`, and a new annotation asking for a Lightstep tracer cannot write its token file.
Before, the first left `.envoy-rev1.json.tmp` behind and the second ended the agent and Envoy with a traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import ExitCode
from tests.conftest import require_root
from tests.supervisor.agent_process import Agent, StartAgent, leftovers, ready
from tests.support.envoy import wait_until

pytestmark = [pytest.mark.envoy, pytest.mark.root]

LIGHTSTEP = r"tracing:\n  lightstep:\n    address: 127.0.0.1:1\n    accessToken: secret\n"


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    with (directory / "filler").open("wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())


def logged(agent: Agent, text: str) -> bool:
    return text in agent.stderr()


def test_a_full_disk_rejects_changes_and_leaves_no_temp_file(start_agent: StartAgent, tmp_path: Path) -> None:
    require_root()
    with small_tmpfs(tmp_path / "config") as config:

        def pod_files(work: Path) -> None:
            (work / "etc" / "istio" / "pod").mkdir(parents=True)
            (work / "etc" / "istio" / "pod" / "annotations").write_text('example.com/owner="test"\n')

        agent = start_agent(proxy_config={"configPath": str(config)}, prepare=pod_files)
        wait_until(lambda: ready(agent) or agent.proc.poll() is not None, timeout=30)
        assert agent.proc.poll() is None, agent.stderr()[-3000:]
        fill(config)

        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: logged(agent, "the running epoch stays: cannot validate"), timeout=20)
        assert not [p.name for p in config.iterdir() if p.name.startswith(".")], list(config.iterdir())

        annotations = agent.stderr_path.parent / "etc" / "istio" / "pod" / "annotations"
        annotations.write_text(f'proxy.istio.io/config="{LIGHTSTEP}"\n')
        wait_until(lambda: logged(agent, "new configuration rejected, Envoy keeps its current one"), timeout=20)
        assert "No space left on device" in agent.stderr().split("new configuration rejected")[-1].splitlines()[0]
        assert agent.proc.poll() is None and ready(agent)
        assert not [p.name for p in config.iterdir() if p.name.startswith(".")], list(config.iterdir())

        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait() == ExitCode.OK
        err = agent.stderr()
        assert "Traceback" not in err, err[-3000:]
        assert leftovers(agent) == []
