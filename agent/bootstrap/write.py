"""Effects: write the bootstrap (and the Lightstep token file) with agent.files.write_atomic; list its dependencies."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from agent.bootstrap.params import LIGHTSTEP_TOKEN_FILE
from agent.bootstrap.render import template_path_of
from agent.bootstrap.tls import tls_files
from agent.config.agent_config import AgentConfig
from agent.config.documents import go_string
from agent.config.proxy_sources import TLS_FILE_METADATA
from agent.files import make_private_dirs, write_atomic, write_error

CERT_DIR = "/etc/certs"
CERT_FILES = ("cert-chain.pem", "key.pem", "root-cert.pem")


def bootstrap_path(cfg: AgentConfig) -> Path:
    """`<configPath>/envoy-rev.json` as Istio names it, `.yaml` when the template is YAML. With customConfigFile the
    user's own extension: Envoy picks its parser by the extension (`.yaml`/`.yml`, `.pb`, `.pb_text`, else JSON),
    and Istio hands Envoy the user's path itself."""
    template = cfg.template_path
    if cfg.custom_config_file:
        suffix = Path(cfg.custom_config_file).suffix or ".json"
    else:
        suffix = ".yaml" if template.endswith((".yaml", ".yaml.tmpl", ".yaml.j2")) else ".json"
    return Path(cfg.proxy.config_path) / f"envoy-rev{suffix}"


def write_side_files(cfg: AgentConfig) -> list[Path]:
    """Files the bootstrap refers to that the agent must write: the Lightstep access token."""
    tracing = cfg.proxy.tracing or {}
    if "lightstep" not in tracing:
        return []
    path = Path(cfg.proxy.config_path) / LIGHTSTEP_TOKEN_FILE
    token = go_string(str(tracing["lightstep"].get("accessToken", "")))
    try:
        write_atomic(path, token.encode(), mode=0o600)
    except OSError as exc:
        raise write_error(path, exc) from None
    return [path]


def check_config_dir(cfg: AgentConfig) -> None:
    """configPath exists (created 0700 if not) and takes a new file: checked before Envoy starts, so a read-only
    or full directory is one line at start instead of an Envoy that can never be given its bootstrap."""
    directory = Path(cfg.proxy.config_path)
    try:
        make_private_dirs(directory)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_error(directory, exc) from None


def write_bootstrap(cfg: AgentConfig, data: bytes) -> Path:
    """Write side files, then the bootstrap itself; returns the bootstrap path."""
    write_side_files(cfg)
    path = bootstrap_path(cfg)
    write_atomic(path, data)
    return path


def bootstrap_dependencies(cfg: AgentConfig) -> list[Path]:
    """Files whose contents are part of the desired state: when one changes, render again and compare bytes.

    Always listed (they may appear later): the cert files (/etc/certs defaults and ISTIO_META_TLS_* overrides),
    the downward-API files, the mesh config, the template, ISTIO_BOOTSTRAP_OVERRIDE and customConfigFile.
    Listed when they exist: files named by the tracer / metrics / access-log TLS settings."""
    meta = cfg.istio_meta()
    paths: list[str] = [f"{CERT_DIR}/{name}" for name in CERT_FILES]
    for key in TLS_FILE_METADATA:
        if meta.get(key):
            paths.append(meta[key])
    paths += [str(cfg.labels_path), str(cfg.annotations_path), str(cfg.mesh_config_path)]
    if cfg.custom_config_file:
        paths.append(cfg.custom_config_file)
    else:
        paths.append(str(template_path_of(cfg)))
    if cfg.bootstrap_override:
        paths.append(cfg.bootstrap_override)
    referenced: list[str] = []
    for settings in (cfg.proxy.tracing, cfg.proxy.envoy_metrics_service, cfg.proxy.envoy_access_log_service):
        if settings:
            referenced += tls_files(settings.get("tlsSettings"), meta)
    paths += [p for p in referenced if Path(p).is_file()]
    return [Path(p) for p in dict.fromkeys(paths)]
