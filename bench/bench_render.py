"""Cost of configuration + bootstrap rendering, the work the agent redoes on every watched-file change.

    /work/venv/bin/python -m bench.bench_render [--iterations 200]

Measured in the same run:
* load: `load_agent_config` for a pod-like environment (reads mesh config / downward-API files, IP discovery);
* render: `render_bootstrap` (params + jinja2 + JSON check) of the default template, with the compiled template
  cached (every re-render after the first) and cold (compiling the template: the first render);
* baseline: `json.loads` + `json.dumps` of the same bootstrap bytes (the floor for producing that JSON in Python);
* command: `pilot-agent render` as a new process, against `python -c "import agent"` (interpreter + import floor).
Prints one JSON object with medians (ms) and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.bootstrap import render as render_module
from agent.bootstrap import render_bootstrap
from agent.config import NodeOverrides, ProxyFlags, load_agent_config


def _median_ms(action: Callable[[], object], iterations: int) -> float:
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        action()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--process-runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "POD_NAME": "reviews-v1-6d8f",
            "POD_NAMESPACE": "default",
            "INSTANCE_IP": "10.244.0.7",
            "ISTIO_METAJSON_LABELS": '{"app":"reviews","version":"v1"}',
            "PROXY_CONFIG": json.dumps({"configPath": f"{tmp}/proxy"}),
        }
        overrides = NodeOverrides(labels_path=f"{tmp}/labels", annotations_path=f"{tmp}/annotations")
        flags = ProxyFlags(mesh_config=f"{tmp}/mesh")
        cfg = load_agent_config(flags, env, overrides)
        data = render_bootstrap(cfg)
        load_ms = _median_ms(lambda: load_agent_config(flags, env, overrides), args.iterations)
        render_ms = _median_ms(lambda: render_bootstrap(cfg), args.iterations)

        def cold() -> None:
            render_module._environment.cache_clear()
            render_bootstrap(cfg)

        cold_ms = _median_ms(cold, max(args.iterations // 10, 5))
        baseline_ms = _median_ms(lambda: json.dumps(json.loads(data), indent=2), args.iterations)
        proc_env = {**os.environ, **env}
        command = [sys.executable, "-m", "agent", "render", "--meshConfig", f"{tmp}/mesh", "-o", f"{tmp}/out.json"]
        floor = [sys.executable, "-c", "import agent.cli"]
        cwd = Path(tmp)
        command_ms = _median_ms(lambda: subprocess.run(command, check=True, env=proc_env, cwd=cwd), args.process_runs)
        floor_ms = _median_ms(lambda: subprocess.run(floor, check=True, env=proc_env, cwd=cwd), args.process_runs)
    print(
        json.dumps(
            {
                "bootstrap_bytes": len(data),
                "load_config_ms": round(load_ms, 3),
                "render_ms": round(render_ms, 3),
                "render_cold_ms": round(cold_ms, 2),
                "json_roundtrip_baseline_ms": round(baseline_ms, 3),
                "render_vs_baseline": round(render_ms / baseline_ms, 1),
                "render_command_ms": round(command_ms, 1),
                "import_floor_ms": round(floor_ms, 1),
                "render_command_vs_floor": round(command_ms / floor_ms, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
