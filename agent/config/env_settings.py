"""Every environment variable the agent reads, declared once (the style of `agent/iptables/config.FlagSpec`).

Each declaration names the variable, its kind (agent.config.envvars), its default as it would be written in the
environment, and its area: the docs page describing it, as named in the Area column of the one
`| Variable | Default | Area | Meaning |` table in docs/reference.md ("Environment variables");
tests/config/test_env_settings.py checks that table against this module. Code reads a setting with
`Environment(...)[SETTING]` (or `SETTING.read(mapping)`); nothing else reads the environment.

To add a setting: declare it below in its area's block, add a row to that table, read it through the declaration. Structured values (JSON, YAML) are declared as TEXT and parsed by their owner with `SETTING.source`
("env NAME") as the error source.
"""

# ruff: noqa: E501 (the declarations are a table, one row a line; see "fmt: off" below)
from __future__ import annotations

from typing import Any

from agent.config.envvars import (
    BOOLEAN,
    DURATION,
    OPTIONAL_BOOLEAN,
    PORT,
    PORT_OR_ZERO,
    TEXT,
    WORD,
    EnvPrefix,
    EnvVar,
    choice,
    integer,
    number,
)

# Areas: the Area cell of a setting's row in docs/reference.md (the link text of the page describing it).
BOOTSTRAP = "configuration"
SUPERVISION = "supervision"
STATUS = "status server"
DNS = "DNS proxy"
CAPTURE = "traffic capture"
MESH = "mesh"

# One line per setting, kept a table on purpose (so the formatter leaves the long rows alone).
# fmt: off
# ---- identity and node metadata (agent/config, agent/bootstrap) ----
POD_NAME = EnvVar("POD_NAME", TEXT, "", BOOTSTRAP)
POD_NAMESPACE = EnvVar("POD_NAMESPACE", TEXT, "", BOOTSTRAP)
INSTANCE_IP = EnvVar("INSTANCE_IP", TEXT, "", BOOTSTRAP)
SERVICE_ACCOUNT = EnvVar("SERVICE_ACCOUNT", TEXT, "", BOOTSTRAP)
HOST_IP = EnvVar("HOST_IP", TEXT, "", BOOTSTRAP)
PROXY_CONFIG = EnvVar("PROXY_CONFIG", TEXT, "", BOOTSTRAP)  # YAML/JSON: agent.config.proxyconfig.parse_text
ISTIO_CPU_LIMIT = EnvVar("ISTIO_CPU_LIMIT", integer(), "0", BOOTSTRAP)
ISTIO_META = EnvPrefix("ISTIO_META_", BOOTSTRAP)
ISTIO_METAJSON = EnvPrefix("ISTIO_METAJSON_", BOOTSTRAP)  # JSON objects: envvars.json_object
ISTIO_BOOTSTRAP = EnvVar("ISTIO_BOOTSTRAP", TEXT, "", BOOTSTRAP)
ISTIO_BOOTSTRAP_OVERRIDE = EnvVar("ISTIO_BOOTSTRAP_OVERRIDE", TEXT, "", BOOTSTRAP)
ISTIO_LOCAL_XDS_DIR = EnvVar("ISTIO_LOCAL_XDS_DIR", TEXT, "", BOOTSTRAP)
ENVOY_STATUS_PORT = EnvVar("ENVOY_STATUS_PORT", PORT, "15021", BOOTSTRAP)
ENVOY_PROMETHEUS_PORT = EnvVar("ENVOY_PROMETHEUS_PORT", PORT, "15090", BOOTSTRAP)
ENVOY_SECURE_METRICS_PORT = EnvVar("ENVOY_SECURE_METRICS_PORT", PORT_OR_ZERO, "0", BOOTSTRAP)
ENVOY_SECURE_MERGED_METRICS_PORT = EnvVar("ENVOY_SECURE_MERGED_METRICS_PORT", PORT_OR_ZERO, "0", BOOTSTRAP)
ISTIO_DELTA_XDS = EnvVar("ISTIO_DELTA_XDS", BOOLEAN, "true", BOOTSTRAP)
ISTIO_DUAL_STACK = EnvVar("ISTIO_DUAL_STACK", BOOLEAN, "false", BOOTSTRAP)
ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL = EnvVar("ENVOY_STATUS_PORT_ENABLE_PROXY_PROTOCOL", BOOLEAN, "false", BOOTSTRAP)
HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED = EnvVar("HTTP_STRIP_FRAGMENT_FROM_PATH_UNSAFE_IF_DISABLED", BOOLEAN, "true", BOOTSTRAP)
COMPLIANCE_POLICY = EnvVar("COMPLIANCE_POLICY", TEXT, "", BOOTSTRAP)
WORKLOAD_IDENTITY_SOCKET_FILE = EnvVar("WORKLOAD_IDENTITY_SOCKET_FILE", TEXT, "socket", BOOTSTRAP)
EXIT_ON_ZERO_ACTIVE_CONNECTIONS = EnvVar("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", BOOLEAN, "false", BOOTSTRAP)
PEER_METADATA_DISCOVERY = EnvVar("PEER_METADATA_DISCOVERY", OPTIONAL_BOOLEAN, "", BOOTSTRAP)
ENVOY_SKIP_DEPRECATED_LOGS = EnvVar("ENVOY_SKIP_DEPRECATED_LOGS", BOOLEAN, "true", BOOTSTRAP)
DNS_PROXY_ADDR = EnvVar("DNS_PROXY_ADDR", TEXT, "", BOOTSTRAP)
XDS_ROOT_CA = EnvVar("XDS_ROOT_CA", TEXT, "", BOOTSTRAP)

# ---- Envoy's command line and supervision (agent/commands/proxy.py -> agent/proxy, agent/supervisor.py) ----
ENVOY_DISABLE_HOT_RESTART = EnvVar("ENVOY_DISABLE_HOT_RESTART", BOOLEAN, "false", SUPERVISION)
ENVOY_BASE_ID = EnvVar("ENVOY_BASE_ID", integer(0, 2**20), "0", SUPERVISION)
ENVOY_RESTART_POLICY = EnvVar("ENVOY_RESTART_POLICY", choice("restart", "exit"), "restart", SUPERVISION)
ENVOY_RESTART_BUDGET = EnvVar("ENVOY_RESTART_BUDGET", integer(), "10", SUPERVISION)
ENVOY_RESTART_INITIAL_DELAY = EnvVar("ENVOY_RESTART_INITIAL_DELAY", DURATION, "200ms", SUPERVISION)
ENVOY_HEALTHY_PERIOD = EnvVar("ENVOY_HEALTHY_PERIOD", DURATION, "60s", SUPERVISION)
ENVOY_SKIP_VALIDATION = EnvVar("ENVOY_SKIP_VALIDATION", BOOLEAN, "false", SUPERVISION)
TERMINATION_LOG_PATH = EnvVar("TERMINATION_LOG_PATH", TEXT, "/dev/termination-log", SUPERVISION)  # "": nowhere
FILE_DEBOUNCE_DURATION = EnvVar("FILE_DEBOUNCE_DURATION", DURATION, "100ms", SUPERVISION)
MINIMUM_DRAIN_DURATION = EnvVar("MINIMUM_DRAIN_DURATION", DURATION, "5s", SUPERVISION)
ISTIO_ENVOY_ENABLE_CORE_DUMP = EnvVar("ISTIO_ENVOY_ENABLE_CORE_DUMP", BOOLEAN, "false", SUPERVISION)
FILE_FLUSH_MIN_SIZE_KB = EnvVar("FILE_FLUSH_MIN_SIZE_KB", integer(), "0", SUPERVISION)

# ---- status server (agent/status) ----
ISTIO_KUBE_APP_PROBERS = EnvVar("ISTIO_KUBE_APP_PROBERS", TEXT, "", STATUS)  # JSON: status.settings
ISTIO_PROMETHEUS_ANNOTATIONS = EnvVar("ISTIO_PROMETHEUS_ANNOTATIONS", TEXT, "", STATUS)  # JSON: status.settings
PILOT_AGENT_MERGE_ENVOY_STATS = EnvVar("PILOT_AGENT_MERGE_ENVOY_STATS", BOOLEAN, "true", STATUS)
METRICS_LOCALHOST_ACCESS_ONLY = EnvVar("METRICS_LOCALHOST_ACCESS_ONLY", BOOLEAN, "false", STATUS)
REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION = EnvVar("REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION", BOOLEAN, "false", STATUS)

# ---- DNS proxy (agent/dns; DNS_PROXY_ADDR is declared with the node metadata above) ----
ISTIO_META_DNS_CAPTURE = EnvVar("ISTIO_META_DNS_CAPTURE", BOOLEAN, "false", DNS)
ISTIO_META_ENABLE_DNS_SERVER = EnvVar("ISTIO_META_ENABLE_DNS_SERVER", BOOLEAN, "false", DNS)
DNS_FORWARD_TIMEOUT = EnvVar("DNS_FORWARD_TIMEOUT", DURATION, "5s", DNS)
DNS_FORWARD_PARALLEL = EnvVar("DNS_FORWARD_PARALLEL", BOOLEAN, "false", DNS)

# ---- istio-iptables, environment only (its flags' env names are agent/iptables/config.FLAGS) ----
ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR = EnvVar("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", WORD, "127.0.0.1/32", CAPTURE)
ISTIO_OUTBOUND_OWNER_GROUPS = EnvVar("ISTIO_OUTBOUND_OWNER_GROUPS", WORD, "*", CAPTURE)
ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE = EnvVar("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", WORD, "", CAPTURE)
DRY_RUN_FILE_PATH = EnvVar("DRY_RUN_FILE_PATH", TEXT, "", CAPTURE)

# ---- the mesh side (agent/mesh -> agent/xds, agent/security; XDS_ROOT_CA is declared with the node metadata) ----
CA_ADDR = EnvVar("CA_ADDR", TEXT, "", MESH)  # "": the discovery address
CA_PROVIDER = EnvVar("CA_PROVIDER", choice("Citadel"), "Citadel", MESH)
CA_ROOT_CA = EnvVar("CA_ROOT_CA", TEXT, "", MESH)  # "SYSTEM" or a path
CA_HEADER = EnvPrefix("CA_HEADER_", MESH)
XDS_HEADER = EnvPrefix("XDS_HEADER_", MESH)
ISTIOD_SAN = EnvVar("ISTIOD_SAN", TEXT, "", MESH)
PILOT_CERT_PROVIDER = EnvVar("PILOT_CERT_PROVIDER", TEXT, "istiod", MESH)
JWT_POLICY = EnvVar("JWT_POLICY", TEXT, "third-party-jwt", MESH)
CREDENTIAL_FETCHER_TYPE = EnvVar("CREDENTIAL_FETCHER_TYPE", choice("JWT", ""), "JWT", MESH)
PROV_CERT = EnvVar("PROV_CERT", TEXT, "", MESH)
OUTPUT_CERTS = EnvVar("OUTPUT_CERTS", TEXT, "", MESH)
FILE_MOUNTED_CERTS = EnvVar("FILE_MOUNTED_CERTS", BOOLEAN, "false", MESH)
TRUST_DOMAIN = EnvVar("TRUST_DOMAIN", TEXT, "cluster.local", MESH)
SECRET_TTL = EnvVar("SECRET_TTL", DURATION, "24h", MESH)
SECRET_GRACE_PERIOD_RATIO = EnvVar("SECRET_GRACE_PERIOD_RATIO", number(0, 1), "0.5", MESH)
SECRET_GRACE_PERIOD_RATIO_JITTER = EnvVar("SECRET_GRACE_PERIOD_RATIO_JITTER", number(0, 1), "0.01", MESH)
WORKLOAD_RSA_KEY_SIZE = EnvVar("WORKLOAD_RSA_KEY_SIZE", integer(2048, 16384), "2048", MESH)
PKCS8_KEY = EnvVar("PKCS8_KEY", BOOLEAN, "false", MESH)
ECC_SIGNATURE_ALGORITHM = EnvVar("ECC_SIGNATURE_ALGORITHM", choice("", "ECDSA"), "", MESH)
ECC_CURVE = EnvVar("ECC_CURVE", choice("P256", "P384"), "P256", MESH)
ISTIO_META_CERT_SIGNER = EnvVar("ISTIO_META_CERT_SIGNER", TEXT, "", MESH)
ISTIO_META_CLUSTER_ID = EnvVar("ISTIO_META_CLUSTER_ID", TEXT, "", MESH)
KUBERNETES_SERVICE_HOST = EnvVar("KUBERNETES_SERVICE_HOST", TEXT, "", MESH)  # set: OUTPUT_CERTS files are 0644

# fmt: on


def declared() -> tuple[EnvVar[Any] | EnvPrefix, ...]:
    """Every declaration in this module, in declaration order."""
    return tuple(value for value in globals().values() if isinstance(value, EnvVar | EnvPrefix))
