"""A test SDS client speaking to the agent's SDS socket the way Envoy does (Istio's sds test client)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

STREAM_SECRETS = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class SdsStream:
    def __init__(self, call: Any) -> None:
        self.call = call
        self.first = True

    async def request(
        self, names: list[str], *, nonce: str = "", version: str = "", error: str = "", node: bool = True
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=SECRET_TYPE, resource_names=names, response_nonce=nonce, version_info=version
        )
        if self.first and node:
            request.node.CopyFrom(
                base_pb2.Node(id="sidecar~10.0.0.1~pod1.fake-namespace~fake-namespace.svc.cluster.local")
            )
        self.first = False
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
        await self.call.write(request)

    async def response(self, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            message = await self.call.read()
        assert message is not grpc.aio.EOF, "stream ended without a response"
        return message

    async def request_response_ack(self, names: list[str], **kwargs: Any) -> Any:
        await self.request(names, **kwargs)
        response = await self.response()
        await self.request(names, nonce=response.nonce, version=response.version_info)
        return response

    async def error(self, timeout: float = 10.0) -> grpc.aio.AioRpcError:
        try:
            async with asyncio.timeout(timeout):
                message = await self.call.read()
        except grpc.aio.AioRpcError as exc:
            return exc
        raise AssertionError(f"expected the stream to fail, got {message}")


def secrets_of(response: Any) -> dict[str, Any]:
    """{name: Secret} of a response."""
    assert response.type_url == SECRET_TYPE
    out = {}
    for body in response.resources:
        secret = secret_pb2.Secret()
        assert body.Unpack(secret)
        out[secret.name] = secret
    return out


@asynccontextmanager
async def sds_channel(socket_path: str) -> AsyncIterator[Any]:
    """Yields open(): a function that opens one more SDS stream on the same channel."""
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        method = channel.stream_stream(
            STREAM_SECRETS,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )

        def open_stream() -> SdsStream:
            return SdsStream(method())

        yield open_stream
