"""Envoy's command line, as Istio's agent builds it (`pkg/envoy/proxy.go` args), as a pure function.

Istio's order is kept so an operator comparing `ps` output with Istio's sees the same line. The one addition is hot
restart: Istio passes `--disable-hot-restart` (PR #31321); with hot restart on, that flag is replaced by
`--restart-epoch N --base-id B --parent-shutdown-time-s P` (Istio's 2019 agent passed the first and last).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class LaunchSettings:
    """Everything that shapes an Envoy command line. Durations are seconds."""

    binary: str
    config_dir: Path
    drain_duration: float = 45.0
    parent_shutdown_duration: float = 60.0
    ip_version: str = "v4"
    file_flush_interval_ms: int = 1000
    file_flush_min_size_kb: int = 0
    # Envoy's -l and --component-log-level, as config split --proxyLogLevel and --proxyComponentLogLevel.
    log_level: str = "warning"
    component_log_level: str = ""
    skip_deprecated_logs: bool = True
    enable_core_dump: bool = False
    # JSON text for --config-yaml (ISTIO_BOOTSTRAP_OVERRIDE, already converted and substituted by config).
    config_yaml: str = ""
    concurrency: int = 0
    hot_restart: bool = True
    # Envoy's default is 0. Each pod has its own IPC namespace in Kubernetes, so 0 is fine there; several agents
    # on one host (tests, a laptop) need distinct ids because the shared memory and domain sockets are named by it.
    base_id: int = 0
    # ".yaml" when the template renders YAML.
    bootstrap_suffix: str = ".json"

    def bootstrap_path(self, epoch: int) -> Path:
        """One bootstrap file per epoch, kept until that epoch exits (Istio's 2019 `envoy-rev<N>.json`).
        Without hot restart there is only ever one: `envoy-rev.json`, Istio's current name."""
        name = f"envoy-rev{epoch}" if self.hot_restart else "envoy-rev"
        return self.config_dir / f"{name}{self.bootstrap_suffix}"


def envoy_argv(settings: LaunchSettings, config_file: Path, epoch: int = 0) -> list[str]:
    """The argv that starts Envoy for `epoch` on `config_file` (binary first)."""
    args = [
        settings.binary,
        "-c",
        str(config_file),
        "--drain-time-s",
        str(int(settings.drain_duration)),
        "--drain-strategy",
        "immediate",
        "--local-address-ip-version",
        settings.ip_version,
        "--file-flush-interval-msec",
        str(settings.file_flush_interval_ms),
    ]
    if settings.hot_restart:
        args += [
            "--restart-epoch",
            str(epoch),
            "--base-id",
            str(settings.base_id),
            "--parent-shutdown-time-s",
            str(int(settings.parent_shutdown_duration)),
        ]
    else:
        args.append("--disable-hot-restart")
    args.append("--allow-unknown-static-fields")
    if settings.file_flush_min_size_kb > 0:
        args += ["--file-flush-min-size-kb", str(settings.file_flush_min_size_kb)]
    args += _log_args(settings)
    if settings.skip_deprecated_logs:
        args.append("--skip-deprecated-logs")
    if settings.enable_core_dump:
        args.append("--enable-core-dump")
    if settings.config_yaml:
        args += ["--config-yaml", settings.config_yaml]
    if settings.concurrency > 0:
        args += ["--concurrency", str(settings.concurrency)]
    return args


def validate_argv(settings: LaunchSettings, config_file: Path) -> list[str]:
    """`envoy --mode validate` with the options of a real start, so Envoy judges the command line too (log
    components, 32-bit durations), but with --disable-hot-restart in place of the hot-restart flags: a validation
    must not touch the running family's shared memory or sockets."""
    binary, *options = envoy_argv(replace(settings, hot_restart=False), config_file)
    return [binary, "--mode", "validate", *options]


def _log_args(settings: LaunchSettings) -> list[str]:
    # Split and checked once, by agent.config.flags.split_component_log (Istio's splitComponentLog).
    args: list[str] = []
    if settings.log_level:
        args += ["-l", settings.log_level]
    if settings.component_log_level:
        args += ["--component-log-level", settings.component_log_level]
    return args
