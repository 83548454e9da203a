"""Build the inputs of one Istio TestGolden case (../shared/conformance/bootstrap/cases.json) and normalise the
output the way Istio's correctForEnvDifference does. Shared by the conformance tests."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bootstrap import default_template_path, render_template, template_params
from agent.config import NodeOverrides, ProxyConfig, ProxyFlags, load_agent_config
from agent.config.agent_config import AgentConfig
from agent.config.schema import normalise_proxy_config

GOLDEN_PROXY_CONFIG_PATH = "/tmp/bootstrap/"
STATS_ANNOTATIONS = (
    "sidecar.istio.io/statsInclusionPrefixes",
    "sidecar.istio.io/statsInclusionSuffixes",
    "sidecar.istio.io/statsInclusionRegexps",
)


@dataclass(frozen=True)
class Rendered:
    cfg: AgentConfig
    text: str  # normalised like Istio's test
    tmp: Path


def load_cases(directory: Path) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads((directory / "cases.json").read_text())["cases"]
    return cases


def golden_proxy_config(directory: Path, case: dict[str, Any]) -> dict[str, Any]:
    golden = json.loads((directory / case["golden"]).read_text())
    proxy_config: dict[str, Any] = golden["node"]["metadata"]["PROXY_CONFIG"]
    return proxy_config


def render_case(directory: Path, case: dict[str, Any], tmp: Path, proxy_config: dict[str, Any]) -> Rendered:
    """Render a case with the project's template; `proxy_config` is the case's ProxyConfig as proto-JSON."""
    base = Path(case["proxycfg"]).stem
    raw = dict(proxy_config)
    raw["configPath"] = f"{tmp}/bootstrap/{base}"
    raw["customConfigFile"] = f"{tmp}/istio/tools/packaging/common/envoy_bootstrap.json"
    annotations = tmp / "annotations"
    annotations.write_text(case["annotation_file_content"])
    opts = case["metadata_options"]
    environ: dict[str, str] = {}
    for entry in opts["Envs"]:
        key, _, value = entry.partition("=")
        environ[key] = value
    overrides = NodeOverrides(
        proxy_config=ProxyConfig.from_raw(normalise_proxy_config(raw, "test")),
        node_id=opts["ID"],
        instance_ips=tuple(opts["InstanceIPs"]),
        pilot_san=tuple(opts["PilotSubjectAltName"]),
        istio_version=case["istio_version"],
        outlier_log_path=opts["OutlierLogPath"],
        envoy_status_port=opts["EnvoyStatusPort"],
        envoy_prometheus_port=opts["EnvoyPrometheusPort"],
        envoy_secure_metrics_port=opts["EnvoySecureMetricsPort"],
        envoy_secure_merged_metrics_port=opts["EnvoySecureMergedMetricsPort"],
        workload_identity_socket_file=opts["WorkloadIdentitySocketFile"],
        skip_deprecated_logs=opts["EnvoySkipDeprecatedLogs"],
        compliance_policy=case["bootstrap_config"]["CompliancePolicy"],
        labels_path=str(tmp / "no-such-labels-file"),
        annotations_path=str(annotations),
    )
    flags = ProxyFlags(log_as_json=case["bootstrap_config"]["LogAsJSON"], sts_port=opts["StsPort"])
    cfg = load_agent_config(flags, environ, overrides)
    data = render_template(template_params(cfg), default_template_path()).decode()
    return Rendered(cfg=cfg, text=normalise(data, str(tmp), case["normalise_locality"]), tmp=tmp)


def normalise(text: str, tmpdir: str, locality: bool) -> str:
    """Istio's correctForEnvDifference, in its order."""
    text = re.sub(r'("access_token_file": ").*(lightstep_access_token.txt")', r"\1/test-path/\2", text)
    text = re.sub(r'("customConfigFile":").*(envoy_bootstrap.json")', '"customConfigFile":"envoy_bootstrap.json"', text)
    text = text.replace(tmpdir, "/tmp")
    text = re.sub(r'("path": ".*/XDS")', '"path": "/tmp/XDS"', text)
    if locality:
        text = re.sub(r'"zone": ".+"', '"zone": ""', text)
        text = re.sub(r'"region": ".+"', '"region": ""', text)
    return text


def stats_matcher_lists(bootstrap: dict[str, Any]) -> dict[str, list[str]]:
    patterns = bootstrap["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"]
    return {
        "prefixes": [p["prefix"] for p in patterns if "prefix" in p],
        "suffixes": [p["suffix"] for p in patterns if "suffix" in p],
        "regexps": [p["safe_regex"]["regex"] for p in patterns if "safe_regex" in p],
    }


def comparable(bootstrap: dict[str, Any]) -> dict[str, Any]:
    """What TestGolden compares: stats_matcher removed, and the stats-inclusion annotation keys at the top of
    node.metadata (the golden's own matcher is never compared). Everything else must be equal."""
    result = json.loads(json.dumps(bootstrap))
    result["stats_config"].pop("stats_matcher", None)
    for key in STATS_ANNOTATIONS:
        result["node"]["metadata"].pop(key, None)
    return dict(result)


def differences(golden: Any, generated: Any, path: str = "") -> list[str]:
    """Readable paths where two JSON trees differ (for assertion messages)."""
    if isinstance(golden, dict) and isinstance(generated, dict):
        out: list[str] = []
        for key in sorted(set(golden) | set(generated)):
            if key not in generated:
                out.append(f"{path}.{key}: missing (golden {json.dumps(golden[key])[:120]})")
            elif key not in golden:
                out.append(f"{path}.{key}: unexpected {json.dumps(generated[key])[:120]}")
            else:
                out += differences(golden[key], generated[key], f"{path}.{key}")
        return out
    if isinstance(golden, list) and isinstance(generated, list) and len(golden) == len(generated):
        return [
            d for i, (a, b) in enumerate(zip(golden, generated, strict=True)) for d in differences(a, b, f"{path}[{i}]")
        ]
    if golden != generated or type(golden) is not type(generated):
        return [f"{path}: golden {json.dumps(golden)[:160]} != generated {json.dumps(generated)[:160]}"]
    return []
