"""Hot-restart epochs with a real Envoy: start, cert-driven hot restart, invalid configs, failed child recovery."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from agent.proxy.shm import shm_path
from tests.supervisor.harness import Rig, bootstrap, make_cert, supervised, tls_rig, until
from tests.support.envoy import free_port, http_get

pytestmark = [pytest.mark.envoy]


def served(port: int) -> bytes:
    status, body = http_get(f"http://127.0.0.1:{port}/", timeout=2)
    assert status == 200
    return body


async def test_starts_epoch_zero_and_stops_clean(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="zero"))
    async with supervised(rig) as run:
        await run.wait_epoch_live(0)
        assert await asyncio.to_thread(served, rig.listener_port) == b"zero"
        assert (tmp_path / "proxy" / "envoy-rev0.json").read_bytes() == rig.input.read_bytes()
        assert shm_path(rig.base_id).exists()
        assert run.lifecycle.not_ready_reason() is None
        assert await run.stop() == 0
        assert run.lifecycle.not_ready_reason() is not None


async def test_cert_change_hot_restarts_and_same_content_does_not(tmp_path: Path) -> None:
    rig, certs = tls_rig(tmp_path)
    async with supervised(rig) as run:
        await run.wait_epoch_live(0)
        make_cert(certs, "two")
        # The parent epoch serves throughout a hot restart: the agent must not call the pod unready meanwhile.
        reasons: list[str] = []

        async def watch_readiness() -> None:
            while True:
                if (reason := run.lifecycle.not_ready_reason()) is not None:
                    reasons.append(reason)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch_readiness())
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await run.wait_epoch_live(1)
        watcher.cancel()
        assert reasons == []
        assert run.value("istio_agent_hot_restarts_total", outcome="done") == 1
        assert run.value("istio_agent_envoy_epoch") == 1
        # The parent retires after --parent-shutdown-time-s and its file goes with it.
        await until(lambda: not (tmp_path / "proxy" / "envoy-rev0.json").exists(), 10)
        assert run.value("istio_agent_envoy_exits_total", cause="clean") == 1
        # Rewriting identical bytes is not a change: no epoch 2.
        (certs / "key.pem").write_bytes((certs / "key.pem").read_bytes())
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await run.logs.wait_for("reconcile step (test): unchanged")
        assert run.value("istio_agent_hot_restarts_total", outcome="done") == 1
        assert await run.admin.live_epoch() == 1


async def test_garbage_cert_keeps_running_epoch_then_recovers_on_next_change(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    certs = tmp_path / "certs"
    make_cert(certs)
    rig.deps = [certs / "cert-chain.pem", certs / "key.pem"]
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="a", cert_dir=certs, tls_port=free_port()))
    async with supervised(rig) as run:
        await run.wait_epoch_live(0)
        (certs / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n")
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await until(lambda: run.value("istio_agent_hot_restarts_total", outcome="invalid") == 1)
        assert run.value("istio_agent_config_errors_total", stage="validate") == 1
        assert await run.admin.live_epoch() == 0
        assert await asyncio.to_thread(served, rig.listener_port) == b"a"
        assert run.lifecycle.not_ready_reason() is None
        # The same bad input again is not re-validated; a real fix is applied.
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await run.logs.wait_for("reconcile step (test): unchanged")
        assert run.value("istio_agent_hot_restarts_total", outcome="invalid") == 1
        make_cert(certs, "fixed")
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await run.wait_epoch_live(1)


async def test_template_rendering_invalid_envoy_config_is_rejected(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="good"))
    async with supervised(rig) as run:
        await run.wait_epoch_live(0)
        rig.write_input(bootstrap(rig.admin_port, rig.listener_port, unknown_cluster=True))
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await until(lambda: run.value("istio_agent_hot_restarts_total", outcome="invalid") == 1)
        assert await asyncio.to_thread(served, rig.listener_port) == b"good"
        rig.write_input(b"{not json")
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await until(lambda: run.value("istio_agent_hot_restarts_total", outcome="invalid") == 2)
        assert await run.admin.live_epoch() == 0


async def test_failed_child_epoch_recovers_to_a_hot_restartable_family(tmp_path: Path) -> None:
    """A port already in use passes validation but kills the child: the agent cold-starts the last good config."""
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="good"))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        async with supervised(rig) as run:
            await run.wait_epoch_live(0)
            rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="bad", extra_port=taken))
            run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
            await until(lambda: run.value("istio_agent_hot_restarts_total", outcome="failed") == 1)
            await run.wait_epoch_live(0)
            assert await asyncio.to_thread(served, rig.listener_port) == b"good"
            # Hot-restartable again: a valid change goes to epoch 1.
            rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="next"))
            run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
            await run.wait_epoch_live(1)
            assert await asyncio.to_thread(served, rig.listener_port) == b"next"
            assert run.value("istio_agent_hot_restarts_total", outcome="done") == 1
    finally:
        blocker.close()


async def test_hot_restart_disabled_ignores_changes_and_uses_no_shared_memory(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="first"))
    async with supervised(rig, launch={"hot_restart": False}) as run:
        await until(run.admin.is_live)
        assert not shm_path(rig.base_id).exists()
        rig.write_input(bootstrap(rig.admin_port, rig.listener_port, body="second"))
        run.supervisor.epochs.notify_change("test")  # type: ignore[union-attr]
        await run.logs.wait_for("hot restart is disabled: it applies at Envoy's next start")
        assert await asyncio.to_thread(served, rig.listener_port) == b"first"
        assert run.value("istio_agent_hot_restarts_total", outcome="done") == 0
