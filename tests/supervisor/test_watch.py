"""The watcher: directory watching, Kubernetes `..data` swaps, debounce, content hashing, deletions."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.files import content_hash
from agent.metrics import AgentMetrics
from agent.proxy.events import WatchSettings
from agent.watch import ChangeSet, Watcher
from tests.supervisor.fake_launcher import recording_logs
from tests.supervisor.harness import make_cert, supervised, tls_rig, until


@asynccontextmanager
async def watching(
    files: dict[Path, str],
    debounce: float = 0.1,
    max_delay: float | None = None,
    on_changing: Callable[[], None] | None = None,
) -> AsyncIterator[tuple[Watcher, list[ChangeSet]]]:
    seen: list[ChangeSet] = []
    metrics = AgentMetrics(process_metrics=False)
    watcher = Watcher(
        files, seen.append, metrics=metrics, debounce=debounce, max_delay=max_delay, on_changing=on_changing
    )
    task = asyncio.create_task(watcher.run())
    await asyncio.wait_for(watcher.ready.wait(), 5)
    try:
        yield watcher, seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def k8s_volume(root: Path, generation: str, files: dict[str, str]) -> None:
    """Write a Kubernetes atomic-writer volume generation and swap `..data` onto it (kubelet's sequence)."""
    gen = root / f"..{generation}"
    gen.mkdir()
    for name, text in files.items():
        (gen / name).write_text(text)
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    tmp = root / "..data_tmp"
    tmp.symlink_to(gen.name)
    os.replace(tmp, root / "..data")


async def test_kubernetes_data_symlink_swap_is_seen(tmp_path: Path) -> None:
    k8s_volume(tmp_path, "gen1", {"cert-chain.pem": "one", "key.pem": "k1"})
    files = {tmp_path / "cert-chain.pem": "cert", tmp_path / "key.pem": "cert"}
    async with watching(files) as (_watcher, seen):
        k8s_volume(tmp_path, "gen2", {"cert-chain.pem": "two", "key.pem": "k1"})
        await until(lambda: len(seen) >= 1, 5)
    assert [c.changed for c in seen] == [(tmp_path / "cert-chain.pem",)]
    assert seen[0].kinds == ("cert",)


async def test_burst_is_debounced_and_same_content_ignored(tmp_path: Path) -> None:
    target = tmp_path / "mesh"
    target.write_text("a")
    with recording_logs("agent.watch") as logs:
        async with watching({target: "mesh"}, debounce=0.5) as (watcher, seen):
            for i in range(10):  # a writer producing the file in pieces
                target.write_text("b" * i)
                await asyncio.sleep(0.02)
            await until(lambda: len(seen) >= 1, 5)
            target.write_text("b" * 9)  # identical content: not a change
            await logs.wait_for("watched files hashed: no change")
            assert len(seen) == 1
        assert watcher.metrics is not None
        assert watcher.metrics.registry.get_sample_value("istio_agent_file_changes_total", {"kind": "mesh"}) == 1


async def test_new_contents_are_announced_while_the_window_is_open(tmp_path: Path) -> None:
    """The supervisor validates ahead on this announcement: it comes before the report, once per new contents."""
    target = tmp_path / "cert.pem"
    target.write_text("one")
    reports_when_announced: list[int] = []
    seen: list[ChangeSet] = []

    def announced() -> None:
        reports_when_announced.append(len(seen))

    with recording_logs("agent.watch") as logs:
        async with watching({target: "cert"}, debounce=0.5, on_changing=announced) as (_watcher, seen):
            target.write_text("two")
            await until(lambda: len(seen) == 1, 5)
            assert reports_when_announced == [0]
            (tmp_path / "unrelated").write_text("x")  # an event, and the same contents: nothing to announce
            await logs.wait_for("watched files hashed: no change")
    assert reports_when_announced == [0]


async def test_watching_runs_no_thread_before_or_after_files_are_added(tmp_path: Path) -> None:
    """The SDS cache's watcher starts empty (and stays so with a CA); once it has files, their events are read on
    the event loop: no thread of watchdog's (an observer ran three or more: dispatch, inotify, one per directory)."""
    target, other = tmp_path / "cert-chain.pem", tmp_path / "other" / "root-cert.pem"
    target.write_text("one")
    other.parent.mkdir()
    other.write_text("one")
    threads = threading.active_count()
    async with watching({}) as (watcher, seen):
        assert threading.active_count() == threads
        watcher.add({target: "sds"})
        target.write_text("two")  # before or after watching began: seen either way
        await until(lambda: len(seen) == 1, 5)
        watcher.add({other: "sds"})
        other.write_text("two")
        await until(lambda: len(seen) == 2, 5)
        assert threading.active_count() == threads
    assert [c.changed for c in seen] == [(target,), (other,)]


async def test_a_directory_that_never_goes_quiet_does_not_postpone_a_change_for_ever(tmp_path: Path) -> None:
    """A log written every 50 ms beside a certificate postponed its rotation for as long as it ran (issue 12)."""
    cert, noisy = tmp_path / "cert.pem", tmp_path / "noisy.log"
    cert.write_text("one")
    async with watching({cert: "cert"}, debounce=0.2, max_delay=0.4) as (_watcher, seen):
        cert.write_text("two")
        for i in range(100):  # 5 s of writes, every 50 ms, into the watched directory
            noisy.write_text(str(i))
            if seen:
                break
            await asyncio.sleep(0.05)
        assert [c.changed for c in seen] == [(cert,)], f"no change reported after {i} writes"


async def test_deleted_file_is_reported_as_deleted_not_changed(tmp_path: Path) -> None:
    target = tmp_path / "root-cert.pem"
    target.write_text("x")
    async with watching({target: "cert"}) as (_watcher, seen):
        target.unlink()
        await until(lambda: len(seen) >= 1, 5)
    assert seen == [ChangeSet((), (target,), ("cert",))]


@pytest.mark.envoy
async def test_cert_swap_in_watched_volume_hot_restarts_envoy(tmp_path: Path) -> None:
    """End to end without signals: a rotated cert file (tmp + rename) -> watcher -> validate -> epoch 1 LIVE."""
    rig, certs = tls_rig(tmp_path)
    watch = WatchSettings({p: "cert" for p in rig.deps}, debounce=0.1)
    async with supervised(rig, watch=watch) as run:
        await run.wait_epoch_live(0)
        make_cert(certs, "two")
        await run.wait_epoch_live(1)
        (certs / "key.pem").unlink()
        await run.logs.wait_for("was deleted: Envoy keeps its current configuration")
        # Deleted: a warning, and the current epoch stays.
        assert await run.admin.live_epoch() == 1
        assert run.value("istio_agent_file_changes_total", kind="cert") >= 3


@pytest.mark.envoy
async def test_a_window_held_past_its_debounce_by_a_busy_loop_counts_the_writes_made_meanwhile(tmp_path: Path) -> None:
    """The debounce waits for the writer's quiet, not the event loop's: when the agent's loop was held past the
    window while the writer went on, what the writer did meanwhile keeps the window open (one report, whole file)."""
    target = tmp_path / "cert-chain.pem"
    target.write_text("a")
    opened = asyncio.Event()
    async with watching({target: "cert"}, debounce=0.1, on_changing=opened.set) as (watcher, seen):
        target.write_text("b1")
        await asyncio.wait_for(opened.wait(), 5)  # the window is open
        time.sleep(0.3)  # noqa: ASYNC251 (the point: the loop is held past the window...)
        target.write_text("b12")  # ...while the writer goes on
        await asyncio.sleep(0.03)  # and finishes within the debounce
        target.write_text("b123")
        await until(lambda: watcher.hashes[target] == content_hash(target), 5)
    assert [c.changed for c in seen] == [(target,)]


async def test_half_written_cert_is_rejected_then_completed_file_applies(tmp_path: Path) -> None:
    rig, certs = tls_rig(tmp_path)
    fresh = tmp_path / "fresh"
    make_cert(fresh, "two")
    full = (fresh / "cert-chain.pem").read_bytes()
    watch = WatchSettings({p: "cert" for p in rig.deps}, debounce=0.1)
    async with supervised(rig, watch=watch) as run:
        await run.wait_epoch_live(0)
        # A writer that stalls half way (longer than the debounce): validation rejects it, epoch 0 keeps serving.
        (certs / "key.pem").write_bytes((fresh / "key.pem").read_bytes())
        (certs / "cert-chain.pem").write_bytes(full[: len(full) // 2])
        await until(lambda: run.value("istio_agent_hot_restarts_total", outcome="invalid") >= 1, 10)
        assert await run.admin.live_epoch() == 0
        (certs / "cert-chain.pem").write_bytes(full)
        await run.wait_epoch_live(1)
        # A burst of partial writes within the debounce window: one hot restart, nothing rejected.
        make_cert(fresh, "three")
        # Once the supervisor is idle: a change reported while epoch 0 drained is applied after it exits, on the
        # files as they are then (a burst begun meanwhile would be read half-written by that step, not the watcher).
        epochs, watcher = run.supervisor.epochs, run.supervisor.watcher
        assert epochs is not None and watcher is not None
        invalid = run.value("istio_agent_hot_restarts_total", outcome="invalid")
        settled = {path: content_hash(path) for path in rig.deps}
        await until(lambda: epochs.numbers() == [1] and epochs.idle() and watcher.hashes == settled, 10)
        data = (fresh / "cert-chain.pem").read_bytes()
        (certs / "key.pem").write_bytes((fresh / "key.pem").read_bytes())
        with (certs / "cert-chain.pem").open("wb") as handle:
            for i in range(0, len(data), 100):
                handle.write(data[i : i + 100])
                handle.flush()
                await asyncio.sleep(0.01)
        await run.wait_epoch_live(2)
        assert await run.admin.live_epoch() == 2
        assert run.value("istio_agent_hot_restarts_total", outcome="invalid") == invalid


async def test_item_with_a_nested_path_in_a_volume_is_seen(tmp_path: Path) -> None:
    """A Secret/ConfigMap item with path `certs/cert.pem`: kubelet links `certs -> ..data/certs`, and a swap of
    `..data` produces events only in the volume's top directory."""

    def generation(name: str, text: str) -> None:
        gen = tmp_path / f"..{name}"
        (gen / "certs").mkdir(parents=True)
        (gen / "certs" / "cert.pem").write_text(text)
        if not (tmp_path / "certs").is_symlink():
            (tmp_path / "certs").symlink_to(Path("..data") / "certs")
        (tmp_path / "..data_tmp").symlink_to(gen.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    generation("gen1", "one")
    cert = tmp_path / "certs" / "cert.pem"
    async with watching({cert: "cert"}) as (_watcher, seen):
        generation("gen2", "two")
        await until(lambda: len(seen) == 1, 5)
        generation("gen3", "three")
        await until(lambda: len(seen) == 2, 5)
    assert [c.changed for c in seen] == [(cert,), (cert,)]


async def test_without_file_events_the_files_are_polled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When inotify limits are reached (the per-uid instance limit is shared by every istio-proxy on a node), the
    watcher must keep working by polling. The kernel limit is simulated: adding a watch raises what the kernel's
    refusal raises."""

    def refuse(_self: object, _directory: Path) -> None:
        raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr("agent.watch._DirectoryEvents.watch", refuse)
    monkeypatch.setattr("agent.watch.POLL_INTERVAL", 0.05)
    target = tmp_path / "mesh"
    target.write_text("a")
    async with watching({target: "mesh"}) as (_watcher, seen):
        target.write_text("b")
        await until(lambda: len(seen) == 1, 5)
    assert seen[0].changed == (target,)
