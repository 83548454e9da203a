"""Istio's CA service: `istio.v1.auth.IstioCertificateService/CreateCertificate` (istio/api
security/v1alpha1/ca.proto; its field 2, `subject_id`, was removed there and is not sent).

    message IstioCertificateRequest {
      string csr = 1; int64 validity_duration = 3; google.protobuf.Struct metadata = 4;
    }
    message IstioCertificateResponse { repeated string cert_chain = 1; }
"""

from __future__ import annotations

from google.protobuf import struct_pb2  # noqa: F401 (puts google/protobuf/struct.proto in the pool first)

from agent.protos.runtime import Field, Message, build

PACKAGE = "istio.v1.auth"
SERVICE = f"{PACKAGE}.IstioCertificateService"
CREATE_CERTIFICATE = f"/{SERVICE}/CreateCertificate"

_classes = build(
    "istio/v1/auth/ca.proto",
    PACKAGE,
    [
        Message(
            "IstioCertificateRequest",
            [
                Field("csr", 1, "string"),
                Field("validity_duration", 3, "int64"),
                Field("metadata", 4, ".google.protobuf.Struct"),
            ],
        ),
        Message("IstioCertificateResponse", [Field("cert_chain", 1, "string", repeated=True)]),
    ],
    dependencies=["google/protobuf/struct.proto"],
)
IstioCertificateRequest = _classes["IstioCertificateRequest"]
IstioCertificateResponse = _classes["IstioCertificateResponse"]
