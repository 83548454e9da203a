"""One Istio TestGolden case (pkg/bootstrap/instance_test.go at the pinned version): its inputs, rendered with this
project's template, normalised the way Istio's correctForEnvDifference does. Shared by the conformance tests.

The per-case inputs are Istio's table, kept in istio_golden_cases.yaml beside this file; what every case shares
(the Go test's MetadataOptions, version and ProxyConfig overrides) is below. The `.proxycfg` inputs and the goldens
are read from Istio's module directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.bootstrap import default_template_path, render_template, template_params
from agent.config import NodeOverrides, ProxyConfig, ProxyFlags, load_agent_config
from agent.config.agent_config import AgentConfig
from agent.config.schema import normalise_proxy_config
from tests.bootstrap import prototext
from tests.support.istio import istio_source

TESTDATA = "pkg/bootstrap/testdata"
STATS_ANNOTATIONS = (
    "sidecar.istio.io/statsInclusionPrefixes",
    "sidecar.istio.io/statsInclusionSuffixes",
    "sidecar.istio.io/statsInclusionRegexps",
)
GLOBAL_DOWNSTREAM_MAX_CONNECTIONS = "ISTIO_META_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS"

# What TestGolden passes to GetNodeMetaData for every case.
NODE_ID = "sidecar~1.2.3.4~foo~bar"
INSTANCE_IPS = ("10.3.3.3", "10.4.4.4", "10.5.5.5", "10.6.6.6", "10.4.4.4")
PILOT_SAN = ("spiffe://cluster.local/ns/istio-system/sa/istio-pilot-service-account",)
OUTLIER_LOG_PATH = "/dev/stdout"
ENVOY_PROMETHEUS_PORT = 15090
ENVOY_STATUS_PORT = 15021
WORKLOAD_IDENTITY_SOCKET_FILE = "test.sock"
ISTIO_VERSION = "binary-1.0"  # test.SetForTest(t, &version.Info.Version, "binary-1.0")
STATUS_PORT = 15020  # loadProxyConfig: set when the .proxycfg leaves it 0

# checkStatsMatcher's expectations (pkg/bootstrap/config.go constants).
V2_PREFIXES = "reporter=,"
V2_SUFFIX = ",component,istio"
REQUIRED_PREFIXES = "cluster_manager,listener_manager,server,cluster.xds-grpc,wasm"
RBAC_SUFFIXES = "rbac.allowed,rbac.denied,shadow_allowed,shadow_denied"
REQUIRED_REGEXES = r"vhost\..*\.route\..*"


@dataclass(frozen=True)
class GoldenCase:
    """One row of Istio's TestGolden table (see istio_golden_cases.yaml for the fields)."""

    base: str
    proxycfg_base: str
    env_vars: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] | None = None
    check_locality: bool = False
    compliance_policy: str = ""
    expect_lightstep_access_token: bool = False
    stats: dict[str, str] = field(default_factory=dict)
    secure_metrics_port: int = 0
    secure_merged_metrics_port: int = 0

    @property
    def name(self) -> str:
        return self.base

    @property
    def golden(self) -> str:
        return f"{self.base}_golden.json"

    @property
    def proxycfg(self) -> str:
        return f"{self.proxycfg_base}.proxycfg"

    @property
    def envs(self) -> list[str]:
        """MetadataOptions.Envs: createEnv's LABELS ({}) and ANNOTATIONS (when the case has any), then envVars.

        Go ranges over the envVars map in random order; sorted here (the output does not depend on the order)."""
        envs = ["ISTIO_METAJSON_LABELS={}"]
        if self.annotations is not None:
            envs.append(f"ISTIO_METAJSON_ANNOTATIONS={go_json(self.annotations)}")
        return envs + [f"{key}={value}" for key, value in sorted(self.env_vars.items())]

    @property
    def annotation_file_content(self) -> str:
        """The temp file the test writes: one `key=%q` line per annotation."""
        return "".join(f"{key}={json.dumps(value)}\n" for key, value in sorted((self.annotations or {}).items()))

    @property
    def proxy_metadata(self) -> dict[str, str]:
        """The test sets ProxyConfig.proxy_metadata to {} plus, from envVars, GlobalDownstreamMaxConnections."""
        value = self.env_vars.get(GLOBAL_DOWNSTREAM_MAX_CONNECTIONS)
        return {} if value is None else {GLOBAL_DOWNSTREAM_MAX_CONNECTIONS: value}

    @property
    def expected_stats_matcher(self) -> dict[str, list[str]]:
        """checkStatsMatcher: the inclusion patterns the generated bootstrap must list, in order."""
        hbone = "workload_discovery," if self.env_vars.get("ISTIO_META_ENABLE_HBONE") == "true" else ""
        extra = self.stats
        prefixes = V2_PREFIXES + (extra["prefixes"] + "," if "prefixes" in extra else hbone)
        suffixes = extra["suffixes"] + "," + RBAC_SUFFIXES if "suffixes" in extra else RBAC_SUFFIXES
        regexps = extra["regexps"] + "," + REQUIRED_REGEXES if "regexps" in extra else REQUIRED_REGEXES
        return {
            "prefixes": (prefixes + REQUIRED_PREFIXES + V2_SUFFIX).split(","),
            "suffixes": suffixes.split(","),
            "regexps": regexps.split(","),
        }


def go_json(value: dict[str, str]) -> str:
    """Go's json.Marshal of a map[string]string: sorted keys, compact, HTML characters escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


@dataclass(frozen=True)
class Rendered:
    cfg: AgentConfig
    text: str  # normalised like Istio's test
    tmp: Path


def load_cases() -> list[GoldenCase]:
    rows = yaml.safe_load(Path(__file__).with_name("istio_golden_cases.yaml").read_text())["cases"]
    return [GoldenCase(proxycfg_base=row.pop("proxycfg", row["base"]), **row) for row in rows]


def istio_testdata() -> Path:
    return istio_source(TESTDATA)


def golden_json(case: GoldenCase) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((istio_testdata() / case.golden).read_text())
    return loaded


def golden_proxy_config(case: GoldenCase) -> dict[str, Any]:
    proxy_config: dict[str, Any] = golden_json(case)["node"]["metadata"]["PROXY_CONFIG"]
    return proxy_config


def proxycfg_input(case: GoldenCase) -> dict[str, Any]:
    """The case's ProxyConfig as the Go test builds it: prototext, then its overrides."""
    raw = prototext.parse((istio_testdata() / case.proxycfg).read_text())
    if not raw.get("status_port"):
        raw["status_port"] = STATUS_PORT
    raw["proxy_metadata"] = case.proxy_metadata
    return normalise_proxy_config(raw, case.proxycfg)


def render_case(case: GoldenCase, tmp: Path, proxy_config: dict[str, Any]) -> Rendered:
    """Render a case with the project's template; `proxy_config` is the case's ProxyConfig as proto-JSON."""
    raw = dict(proxy_config)
    raw["configPath"] = f"{tmp}/bootstrap/{case.proxycfg_base}"
    raw["customConfigFile"] = f"{tmp}/istio/tools/packaging/common/envoy_bootstrap.json"
    annotations = tmp / "annotations"
    annotations.write_text(case.annotation_file_content)
    environ: dict[str, str] = {}
    for entry in case.envs:
        key, _, value = entry.partition("=")
        environ[key] = value
    overrides = NodeOverrides(
        proxy_config=ProxyConfig.from_raw(normalise_proxy_config(raw, "test")),
        node_id=NODE_ID,
        instance_ips=INSTANCE_IPS,
        pilot_san=PILOT_SAN,
        istio_version=ISTIO_VERSION,
        outlier_log_path=OUTLIER_LOG_PATH,
        envoy_status_port=ENVOY_STATUS_PORT,
        envoy_prometheus_port=ENVOY_PROMETHEUS_PORT,
        envoy_secure_metrics_port=case.secure_metrics_port,
        envoy_secure_merged_metrics_port=case.secure_merged_metrics_port,
        workload_identity_socket_file=WORKLOAD_IDENTITY_SOCKET_FILE,
        skip_deprecated_logs=False,
        compliance_policy=case.compliance_policy,
        labels_path=str(tmp / "no-such-labels-file"),
        annotations_path=str(annotations),
    )
    flags = ProxyFlags(log_as_json=False, sts_port=0)
    cfg = load_agent_config(flags, environ, overrides)
    data = render_template(template_params(cfg), default_template_path()).decode()
    return Rendered(cfg=cfg, text=normalise(data, str(tmp), not case.check_locality), tmp=tmp)


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
