"""Just enough of the SDS messages, built at run time: what the SDS server reads from Envoy's requests and writes in
its responses, with the real messages' field numbers (envoy/service/discovery/v3/discovery.proto,
envoy/extensions/transport_sockets/tls/v3/{secret,common}.proto, envoy/config/core/v3/base.proto). The bytes are the
same the generated messages give for the same fields (tests/security/test_sds.py reads them back with those); the
agent then loads neither the ~60 generated Envoy modules nor their descriptors (~1.2 MiB, ~20 ms of import).
Everything else in a request (the node's metadata, say) stays as unknown fields.
"""

from __future__ import annotations

from google.protobuf import any_pb2  # noqa: F401 (puts google/protobuf/any.proto in the pool first)

from agent.protos.runtime import Field, Message, build

PACKAGE = "pilot_agent.sds.wire"
_P = f".{PACKAGE}"

_classes = build(
    "pilot_agent/sds/wire.proto",
    PACKAGE,
    [
        # google.rpc.Status, without details.
        Message("Status", [Field("code", 1, "int32"), Field("message", 2, "string")]),
        # envoy.config.core.v3.Node: id = 1.
        Message("Node", [Field("id", 1, "string")]),
        # envoy.service.discovery.v3.DiscoveryRequest.
        Message(
            "DiscoveryRequest",
            [
                Field("version_info", 1, "string"),
                Field("node", 2, f"{_P}.Node"),
                Field("resource_names", 3, "string", repeated=True),
                Field("type_url", 4, "string"),
                Field("response_nonce", 5, "string"),
                Field("error_detail", 6, f"{_P}.Status"),
            ],
        ),
        # envoy.service.discovery.v3.DiscoveryResponse.
        Message(
            "DiscoveryResponse",
            [
                Field("version_info", 1, "string"),
                Field("resources", 2, ".google.protobuf.Any", repeated=True),
                Field("type_url", 4, "string"),
                Field("nonce", 5, "string"),
            ],
        ),
        # envoy.config.core.v3.DataSource: filename = 1, inline_bytes = 2 (a oneof: one is set at a time here).
        Message("DataSource", [Field("filename", 1, "string"), Field("inline_bytes", 2, "bytes")]),
        # envoy.extensions.transport_sockets.tls.v3.TlsCertificate and CertificateValidationContext.
        Message(
            "TlsCertificate",
            [Field("certificate_chain", 1, f"{_P}.DataSource"), Field("private_key", 2, f"{_P}.DataSource")],
        ),
        Message(
            "CertificateValidationContext",
            [Field("trusted_ca", 1, f"{_P}.DataSource"), Field("crl", 7, f"{_P}.DataSource")],
        ),
        # envoy.extensions.transport_sockets.tls.v3.Secret: name = 1, tls_certificate = 2, validation_context = 4.
        Message(
            "Secret",
            [
                Field("name", 1, "string"),
                Field("tls_certificate", 2, f"{_P}.TlsCertificate"),
                Field("validation_context", 4, f"{_P}.CertificateValidationContext"),
            ],
        ),
    ],
    dependencies=["google/protobuf/any.proto"],
)
DiscoveryRequest = _classes["DiscoveryRequest"]
DiscoveryResponse = _classes["DiscoveryResponse"]
DataSource = _classes["DataSource"]
CertificateValidationContext = _classes["CertificateValidationContext"]
Secret = _classes["Secret"]
