"""Upstream TLS transport sockets for the tracer / metrics / access-log clusters (Istio's tlsContextConvert)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SDS_CLUSTER = "sds-grpc"


def sds_secret(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
                "transport_api_version": "V3",
            },
            "resource_api_version": "V3",
        },
    }


def _validation(tls: Mapping[str, Any], root_name: str) -> dict[str, Any]:
    default: dict[str, Any] = {}
    sans = tls.get("subjectAltNames") or ()
    if sans:
        default["match_subject_alt_names"] = [{"exact": s} for s in sans]
    return {"default_validation_context": default, "validation_context_sds_secret_config": sds_secret(root_name)}


def transport_socket(
    tls: Mapping[str, Any] | None, sni_name: str, meta: Mapping[str, Any], h2: bool
) -> dict[str, Any] | None:
    """None for no TLS (mode DISABLE or unset). ISTIO_META_TLS_CLIENT_* override the file paths."""
    if not tls:
        return None
    mode = tls.get("mode", "DISABLE")
    common: dict[str, Any] = {}
    ctx: dict[str, Any] = {"common_tls_context": common}
    root = str(meta.get("TLS_CLIENT_ROOT_CERT") or tls.get("caCertificates", ""))
    if mode == "SIMPLE":
        common["combined_validation_context"] = _validation(tls, f"file-root:{root}" if root else "")
        common["alpn_protocols"] = ["h2"]
    elif mode == "MUTUAL":
        cert = str(meta.get("TLS_CLIENT_CERT_CHAIN") or tls.get("clientCertificate", ""))
        key = str(meta.get("TLS_CLIENT_KEY") or tls.get("privateKey", ""))
        if cert and key:
            common["tls_certificate_sds_secret_configs"] = [sds_secret(f"file-cert:{cert}~{key}")]
        common["combined_validation_context"] = _validation(tls, f"file-root:{root}" if root else "")
        common["alpn_protocols"] = ["h2"]
    elif mode == "ISTIO_MUTUAL":
        common["tls_certificate_sds_secret_configs"] = [sds_secret("default")]
        common["combined_validation_context"] = _validation(tls, "ROOTCA")
        common["alpn_protocols"] = ["istio-h2", "h2"]
        if not tls.get("sni"):
            ctx["sni"] = sni_name
    else:
        return None
    if tls.get("sni"):
        ctx["sni"] = tls["sni"]
    if not h2:
        common.pop("alpn_protocols", None)
    ctx["@type"] = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def tls_files(tls: Mapping[str, Any] | None, meta: Mapping[str, Any]) -> list[str]:
    """File paths a TLS setting makes Envoy read (through the agent's SDS)."""
    if not tls:
        return []
    keys = (("TLS_CLIENT_ROOT_CERT", "caCertificates"), ("TLS_CLIENT_CERT_CHAIN", "clientCertificate"))
    paths = [str(meta.get(m) or tls.get(f, "")) for m, f in keys]
    paths.append(str(meta.get("TLS_CLIENT_KEY") or tls.get("privateKey", "")))
    return [p for p in paths if p]
