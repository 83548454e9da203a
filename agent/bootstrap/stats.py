"""Envoy stats configuration with Istio's rules (pkg/bootstrap getStatsOptions)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from agent.config.agent_config import AgentConfig
from agent.config.durations import format_proto, parse_duration
from agent.errors import ConfigError

log = logging.getLogger("agent.bootstrap")

ANNO_PREFIXES = "sidecar.istio.io/statsInclusionPrefixes"
ANNO_SUFFIXES = "sidecar.istio.io/statsInclusionSuffixes"
ANNO_REGEXPS = "sidecar.istio.io/statsInclusionRegexps"
ANNO_EXTRA_TAGS = "sidecar.istio.io/extraStatTags"
ANNO_HISTOGRAM = "sidecar.istio.io/statsHistogramBuckets"
ANNO_FLUSH = "sidecar.istio.io/statsFlushInterval"
ANNO_EVICTION = "sidecar.istio.io/statsEvictionInterval"

# Needed by readiness checks (cluster_manager, listener_manager, server) and the xDS connection.
REQUIRED_PREFIXES = ("cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm")
RBAC_SUFFIXES = ("rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied")
DRAIN_SUFFIX = "downstream_cx_active"  # needed when the agent exits on zero active connections
REQUIRED_REGEXPS = (r"vhost\..*\.route\..*",)
DEFAULT_FLUSH_SECONDS = 5.0
# Envoy's bootstrap: stats_flush_interval in [1ms, 300s), stats_eviction_interval >= 1ms.
MIN_INTERVAL, MAX_FLUSH = 0.001, 300.0
# Envoy refuses a regexp whose RE2 program is larger than this runtime flag (Istio sets it; runtimeValues may too).
RE2_PROGRAM_SIZE_FLAG = "re2.max_program_size.error_level"
DEFAULT_RE2_PROGRAM_SIZE = "32768"
ENVOY_RE2_PROGRAM_SIZE = 100

# Istio's stat tag extraction, in order; extra tags go between mongo_prefix and cache.
_TAGS_HEAD = (
    ("cluster_name", r"^cluster(\.(.+);)"),
    ("http_conn_manager_prefix", r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)"),
    ("thread_name", r"^server(\.(.+))\.watchdog"),
    ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
    ("response_code", r"_rq(_(\d{3}))$"),
    ("response_code_class", r"_rq(_(\dxx))$"),
    (
        "http_conn_manager_listener_prefix",
        r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
    ),
    ("listener_address", r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"),
    ("mongo_prefix", r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"),
)
_TAGS_TAIL = (
    ("cache", r"(cache\.(.+?)\.)"),
    ("component", r"(component\.(.+?)\.)"),
    ("tag", r"(tag\.(.+?);\.)"),
    ("wasm_filter", r"(wasm_filter\.(.+?)\.)"),
    ("authz_enforce_result", r"rbac(\.(allowed|denied))"),
    ("authz_dry_run_action", r"(\.istio_dry_run_(allow|deny)_)"),
    ("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
)


def _substitute(patterns: Sequence[str], ips: Sequence[str]) -> list[str]:
    """ "http.{pod_ip}_" with ips [a, b] -> ["http.a_", "http.b_"]."""
    out: list[str] = []
    for pattern in patterns:
        if "{pod_ip}" in pattern:
            out.extend(pattern.replace("{pod_ip}", ip) for ip in ips)
        else:
            out.append(pattern)
    return out


def _option(
    annotation: str | None, from_proxy: Sequence[str] | None, required: Sequence[str], ips: Sequence[str]
) -> list[str]:
    # An annotation replaces the ProxyConfig list (they are not merged); required entries are always appended.
    if annotation:
        chosen: list[str] = annotation.split(",")
    elif from_proxy is not None:
        chosen = list(from_proxy)
    else:
        chosen = []
    return _substitute([*chosen, *required], ips)


def _user_entries(cfg: AgentConfig, annotation: str, proxy_field: str) -> tuple[str, str, list[str]]:
    """(source, field, entries) of one inclusion list as the user gave it (the annotation replaces ProxyConfig's).
    Envoy refuses an empty prefix, suffix or regexp (and so the whole bootstrap): refused here, naming it."""
    if cfg.annotations.get(annotation):
        source, field, entries = str(cfg.annotations_path), annotation, cfg.annotations[annotation].split(",")
    else:
        matcher: Mapping[str, Any] = cfg.proxy.proxy_stats_matcher or {}
        source, field, entries = "ProxyConfig", f"proxyStatsMatcher.{proxy_field}", list(matcher.get(proxy_field) or ())
    if "" in entries:
        raise ConfigError(source, field, "an empty entry (Envoy needs at least one character)")
    return source, field, entries


def _check_regexps(cfg: AgentConfig) -> None:
    """Envoy compiles stats_matcher regexps with RE2 and refuses the whole bootstrap over one bad pattern (or one
    whose program is above the re2.max_program_size.error_level runtime flag): refuse it here, naming it."""
    source, field, patterns = _user_entries(cfg, ANNO_REGEXPS, "inclusionRegexps")
    if not patterns:
        return
    import re2  # noqa: PLC0415 (lazy: only when regexps are configured; ~7 ms)

    options = re2.Options()
    options.log_errors = False  # RE2 would also print each error to stderr
    limit = _program_size_limit(cfg)
    for pattern in patterns:
        try:
            program_size = re2.compile(pattern, options).programsize
        except re2.error as exc:
            problem = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise ConfigError(source, field, f"{pattern!r} is not a valid RE2 regexp: {problem}") from None
        if limit is not None and program_size > limit:
            raise ConfigError(
                source, field, f"{pattern!r}: RE2 program size {program_size} is above re2.max_program_size ({limit})"
            )


def _program_size_limit(cfg: AgentConfig) -> int | None:
    value = cfg.proxy.runtime_values.get(RE2_PROGRAM_SIZE_FLAG, DEFAULT_RE2_PROGRAM_SIZE)
    if value == "":  # runtimeValues removed Istio's flag: Envoy's own default applies
        return ENVOY_RE2_PROGRAM_SIZE
    return int(value) if re.fullmatch("[0-9]+", value) else None


def inclusion_patterns(cfg: AgentConfig, metadata_discovery: bool) -> list[dict[str, Any]]:
    annotations = cfg.annotations
    ips = list(dict.fromkeys(cfg.instance_ips))
    matcher: Mapping[str, Any] = cfg.proxy.proxy_stats_matcher or {}
    suffixes = (*RBAC_SUFFIXES, DRAIN_SUFFIX) if cfg.node.exit_on_zero_active_connections else RBAC_SUFFIXES
    patterns: list[dict[str, Any]] = [{"prefix": "reporter="}]
    if metadata_discovery:
        patterns.append({"prefix": "workload_discovery"})
    _user_entries(cfg, ANNO_PREFIXES, "inclusionPrefixes")
    _user_entries(cfg, ANNO_SUFFIXES, "inclusionSuffixes")
    _check_regexps(cfg)
    prefixes = _option(annotations.get(ANNO_PREFIXES), matcher.get("inclusionPrefixes"), REQUIRED_PREFIXES, ips)
    patterns += [{"prefix": p} for p in prefixes]
    sfx = _option(annotations.get(ANNO_SUFFIXES), matcher.get("inclusionSuffixes"), suffixes, ips)
    patterns += [{"suffix": s} for s in sfx]
    regexps = _option(annotations.get(ANNO_REGEXPS), matcher.get("inclusionRegexps"), REQUIRED_REGEXPS, ips)
    patterns += [{"safe_regex": {"regex": r}} for r in regexps]
    patterns += [{"prefix": "component"}, {"prefix": "istio"}]
    return patterns


def stats_tags(cfg: AgentConfig) -> list[dict[str, str]]:
    extra = [t for t in cfg.proxy.extra_stat_tags if t]
    extra += [t for t in cfg.annotations.get(ANNO_EXTRA_TAGS, "").split(",") if t]
    extra = list(dict.fromkeys(extra))
    tags = [{"tag_name": n, "regex": r} for n, r in _TAGS_HEAD]
    tags += [{"tag_name": t, "regex": f"({t}=\\.=(.*?);\\.;)"} for t in extra]
    tags += [{"tag_name": n, "regex": r} for n, r in _TAGS_TAIL]
    return tags


def histogram_buckets(cfg: AgentConfig) -> list[dict[str, Any]] | None:
    text = cfg.annotations.get(ANNO_HISTOGRAM)
    if text is None:
        return None
    source = f"{cfg.annotations_path}"
    try:
        value = json.loads(text, parse_constant=lambda c: float("nan"))
    except (ValueError, RecursionError) as exc:
        raise ConfigError(source, ANNO_HISTOGRAM, f"not valid JSON: {exc}") from None
    ok = isinstance(value, dict) and all(
        isinstance(v, list)
        and all(isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) for b in v)
        for v in value.values()
    )
    if not ok:
        raise ConfigError(source, ANNO_HISTOGRAM, 'expected {"prefix": [bucket, ...], ...} with numeric buckets')
    # Envoy's HistogramBucketSettings: a non-empty prefix, buckets > 0 and unique.
    for prefix, buckets in value.items():
        if not prefix or any(b <= 0 for b in buckets) or len(set(buckets)) != len(buckets):
            raise ConfigError(
                source, ANNO_HISTOGRAM, f"{prefix!r}: Envoy needs a non-empty prefix and unique buckets above 0"
            )
    return [{"match": {"prefix": p}, "buckets": value[p]} for p in sorted(value)] or None


def intervals(cfg: AgentConfig) -> tuple[str | None, str | None]:
    """(stats_flush_interval, stats_eviction_interval) as proto durations, None when not set."""
    source = f"{cfg.annotations_path}"
    flush = DEFAULT_FLUSH_SECONDS
    flush_out = None
    if ANNO_FLUSH in cfg.annotations:
        flush = parse_duration(cfg.annotations[ANNO_FLUSH], source, ANNO_FLUSH)
        if not MIN_INTERVAL <= flush < MAX_FLUSH:
            raise ConfigError(source, ANNO_FLUSH, f"{format_proto(flush)} is not in Envoy's range [1ms, 300s)")
        flush_out = format_proto(flush)
    eviction_out = None
    if ANNO_EVICTION in cfg.annotations:
        eviction = parse_duration(cfg.annotations[ANNO_EVICTION], source, ANNO_EVICTION)
        if eviction < MIN_INTERVAL:
            raise ConfigError(source, ANNO_EVICTION, f"{format_proto(eviction)} is below Envoy's minimum of 1ms")
        flush_us, eviction_us = round(flush * 1e6), round(eviction * 1e6)
        if flush_us == 0 or eviction_us % flush_us != 0:
            # Istio only warns and drops it (golden invalid_stats_eviction_interval): keep that behaviour.
            log.warning("%s: %s must be a multiple of the stats flush interval; ignored", source, ANNO_EVICTION)
        else:
            eviction_out = format_proto(eviction)
    return flush_out, eviction_out
