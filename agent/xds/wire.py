"""Just enough of the ADS messages to see what passes through the proxy, built at run time.

The proxy forwards Envoy's and istiod's bytes untouched; to count, log, find Envoy's first LDS request and hand
agent-handled types to their handler it reads a few fields through these "peek" messages: the real messages'
field numbers (envoy/service/discovery/v3/discovery.proto) with everything else left as unknown fields. Parsing
a multi-megabyte CDS response this way copies its resources as opaque bytes instead of building them as
messages. The ACK/NACK requests the proxy writes itself are these messages serialized: the same bytes the full
messages would give for the same fields.
"""

from __future__ import annotations

from google.protobuf import any_pb2  # noqa: F401 (puts google/protobuf/any.proto in the pool first)

from agent.protos.runtime import Field, Message, build

PACKAGE = "pilot_agent.xds.wire"
_STATUS = f".{PACKAGE}.Status"

_classes = build(
    "pilot_agent/xds/wire.proto",
    PACKAGE,
    [
        # google.rpc.Status, without details.
        Message("Status", [Field("code", 1, "int32"), Field("message", 2, "string")]),
        # DiscoveryRequest: version_info = 1, type_url = 4, response_nonce = 5, error_detail = 6.
        Message(
            "SotwRequest",
            [
                Field("version_info", 1, "string"),
                Field("type_url", 4, "string"),
                Field("response_nonce", 5, "string"),
                Field("error_detail", 6, _STATUS),
            ],
        ),
        # DeltaDiscoveryRequest: type_url = 2, response_nonce = 6, error_detail = 7.
        Message(
            "DeltaRequest",
            [
                Field("type_url", 2, "string"),
                Field("response_nonce", 6, "string"),
                Field("error_detail", 7, _STATUS),
            ],
        ),
        # DiscoveryResponse: version_info = 1, type_url = 4, nonce = 5; DeltaDiscoveryResponse:
        # system_version_info = 1, type_url = 4, nonce = 5. One peek serves both.
        Message(
            "Response",
            [Field("version_info", 1, "string"), Field("type_url", 4, "string"), Field("nonce", 5, "string")],
        ),
        # The resources, for the types an agent handler consumes: DiscoveryResponse.resources = 2 (Any) and
        # DeltaDiscoveryResponse.resources = 2 (Resource, whose `resource` = 2 is the Any).
        Message("SotwResources", [Field("resources", 2, ".google.protobuf.Any", repeated=True)]),
        Message("DeltaResource", [Field("resource", 2, ".google.protobuf.Any")]),
        Message("DeltaResources", [Field("resources", 2, f".{PACKAGE}.DeltaResource", repeated=True)]),
    ],
    dependencies=["google/protobuf/any.proto"],
)
Status = _classes["Status"]
SotwRequest = _classes["SotwRequest"]
DeltaRequest = _classes["DeltaRequest"]
Response = _classes["Response"]
SotwResources = _classes["SotwResources"]
DeltaResources = _classes["DeltaResources"]
