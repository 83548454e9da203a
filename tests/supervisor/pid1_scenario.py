"""Run as PID 1 of a fresh PID namespace (see test_pid1.py): many Envoy exits while orphans keep dying around them.

Prints one JSON line: the exit codes expected and observed for every Envoy, what the reaper reaped, zombies left.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path

from agent.pid1 import OrphanReaper, zombie_children
from agent.proxy.process import EnvoyProcess
from agent.proxy.spawn import SpawnedEnvoy

GOOD = '{"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}}'


async def envoy_exit(binary: str, work: Path, index: int, own: set[int]) -> tuple[int, int]:
    kind = index % 4
    sink = await asyncio.to_thread(open, os.devnull, "wb")
    try:
        if kind == 0:  # valid config, validate mode: 0
            argv, expected = [binary, "--mode", "validate", "-c", str(work / "good.json")], 0
        elif kind == 1:  # invalid config, validate mode: 1
            argv, expected = [binary, "--mode", "validate", "-c", str(work / "bad.json")], 1
        elif kind == 2:  # invalid config, serving mode: 1
            argv, expected = [binary, "-c", str(work / "bad.json"), "--disable-hot-restart"], 1
        else:  # a running Envoy killed: -9
            argv, expected = [binary, "-c", str(work / "good.json"), "--disable-hot-restart", "-l", "off"], -9
        proc = EnvoyProcess(SpawnedEnvoy(argv, index, sink=sink))
        own.add(proc.pid)
        task = asyncio.ensure_future(proc.run())
        if kind == 3:
            await asyncio.sleep(0.05)
            proc.kill()
        info = await task
        own.discard(proc.pid)
        return expected, info.returncode
    finally:
        sink.close()


async def orphan_maker(stop: asyncio.Event) -> None:
    # `sh` forks a child and exits at once: the child is re-parented to us (PID 1) and dies a moment later.
    while not stop.is_set():
        await asyncio.create_subprocess_exec("sh", "-c", f"(sleep 0.0{random.randint(1, 9)}; exit 3) & exit 0")
        await asyncio.sleep(0.01)


async def main() -> None:
    assert os.getpid() == 1, "run me as PID 1 (unshare --pid --fork --mount-proc)"
    binary, work, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    (work / "good.json").write_text(GOOD)
    (work / "bad.json").write_text('{"admin": {"address": {"socket_address": {"port_value": "x"}}}}')
    own: set[int] = set()
    reaper = OrphanReaper(lambda: set(own), grace=0.2, interval=0.1)
    reaper_task = asyncio.ensure_future(reaper.run())
    stop = asyncio.Event()
    makers = [asyncio.ensure_future(orphan_maker(stop)) for _ in range(2)]
    semaphore = asyncio.Semaphore(6)

    async def one(i: int) -> tuple[int, int]:
        async with semaphore:
            return await envoy_exit(binary, work, i, own)

    results = await asyncio.gather(*(one(i) for i in range(count)))
    stop.set()
    await asyncio.gather(*makers)
    await asyncio.sleep(0.6)  # let the last orphans die and wait out the grace period
    reaper_task.cancel()
    await asyncio.gather(reaper_task, return_exceptions=True)
    wrong = [(i, e, o) for i, (e, o) in enumerate(results) if e != o]
    print(
        json.dumps(
            {
                "exits": len(results),
                "wrong": wrong,
                "reaped": reaper.reaped_count,
                "reaped_codes": sorted({code for _, code in reaper.reaped}),
                "zombies_left": sorted(zombie_children(1)),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
