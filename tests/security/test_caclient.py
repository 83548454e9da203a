"""The CA client against a gRPC CA on loopback TLS (tests/support/fake_istiod.py's CA service: a FAKE istiod,
standing in until the standalone-istiod tests in tests/mesh run the real one)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from agent.security import pki
from agent.security.caclient import ATTEMPTS, CaClient, CaError
from agent.security.metrics import SecurityMetrics
from agent.security.settings import KeyOptions, TlsSettings, UpstreamSettings, server_name
from tests.security.conftest import IDENTITY
from tests.support.fake_istiod import FakeIstiod
from tests.support.mesh_pki import MeshCa, uri_sans

TOKEN = "fake-token"


@pytest.fixture(params=[False])
def istiod(mesh_ca: MeshCa, request: pytest.FixtureRequest) -> Iterator[FakeIstiod]:
    chain, key = mesh_ca.server(["istiod.istio-system.svc"])
    with FakeIstiod(
        "127.0.0.1:0",
        tls=(chain, key, mesh_ca.root_pem),
        ca=mesh_ca,
        tokens={TOKEN: IDENTITY},
        require_client_cert=request.param,
    ) as fake:
        yield fake


def upstream(istiod: FakeIstiod, directory: Path, ca: MeshCa, **tls: str) -> UpstreamSettings:
    root = directory / "root-cert.pem"
    if not root.exists():
        root.write_bytes(ca.root_pem)
    (directory / "istio-token").write_text(TOKEN + "\n")
    address = istiod.address.replace("127.0.0.1", "localhost")  # "localhost" means istiod's own name
    return UpstreamSettings(
        address=address,
        tls=TlsSettings(root_cert=str(root), server_name=server_name(address), **tls),
        token_path=str(directory / "istio-token"),
        headers=(("clusterid", "Kubernetes"), ("x-extra", "value")),
    )


class NoSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def client(settings: UpstreamSettings, sleep: NoSleep | None = None) -> CaClient:
    return CaClient(settings, SecurityMetrics(CollectorRegistry()), cert_signer="", sleep=sleep or NoSleep())


def csr() -> bytes:
    return pki.generate_csr("spiffe://cluster.local/ns/ignored/sa/by-istiod", KeyOptions(2048))[0]


async def test_token_authenticated_csr(istiod: FakeIstiod, short_dir: Path, mesh_ca: MeshCa) -> None:
    ca = client(upstream(istiod, short_dir, mesh_ca))
    chain = await ca.sign(csr(), 3600)
    await ca.close()
    assert uri_sans(chain[0].encode()) == [IDENTITY]  # from authentication, not from the CSR
    assert chain[-1].encode() == mesh_ca.root_pem
    assert istiod.csr_ttls == [3600]
    headers = istiod.metadata[-1]
    assert headers["clusterid"] == "Kubernetes" and headers["x-extra"] == "value"


async def test_wrong_token_is_refused_without_retrying(istiod: FakeIstiod, short_dir: Path, mesh_ca: MeshCa) -> None:
    settings = upstream(istiod, short_dir, mesh_ca)
    (short_dir / "istio-token").write_text("wrong")
    ca = client(settings)
    with pytest.raises(CaError) as raised:
        await ca.sign(csr(), 3600)
    await ca.close()
    assert raised.value.refused and "request authenticate failure" in str(raised.value)
    assert istiod.auth_failures == 1


async def test_outage_is_retried_then_reported(istiod: FakeIstiod, short_dir: Path, mesh_ca: MeshCa) -> None:
    istiod.ca_failure = grpc.StatusCode.UNAVAILABLE
    sleep = NoSleep()
    ca = client(upstream(istiod, short_dir, mesh_ca), sleep)
    with pytest.raises(CaError) as raised:
        await ca.sign(csr(), 3600)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and not raised.value.refused
    assert len(sleep.waits) == ATTEMPTS - 1
    for wait, expected in zip(sleep.waits, (0.1, 0.2, 0.4, 0.8), strict=True):  # 100 ms doubling, 10% jitter
        assert expected * 0.9 <= wait <= expected * 1.1
    assert ca.metrics.registry.get_sample_value("istio_agent_num_outgoing_retries", {"request_type": "csr"}) == 4
    istiod.ca_failure = None
    assert len(await ca.sign(csr(), 3600)) == 3
    await ca.close()


async def test_wrong_root_then_the_fixed_file_applies_to_the_next_call(
    istiod: FakeIstiod, short_dir: Path, mesh_ca: MeshCa
) -> None:
    (short_dir / "root-cert.pem").write_bytes(MeshCa("other").root_pem)
    ca = client(upstream(istiod, short_dir, mesh_ca))
    with pytest.raises(CaError) as raised:
        await ca.sign(csr(), 3600)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    (short_dir / "root-cert.pem").write_bytes(mesh_ca.root_pem)  # what a ConfigMap update does
    assert len(await ca.sign(csr(), 3600)) == 3
    await ca.close()


@pytest.mark.parametrize("istiod", [True], indirect=True, ids=["mtls"])
async def test_client_certificate_authenticates_without_token(
    istiod: FakeIstiod, short_dir: Path, mesh_ca: MeshCa
) -> None:
    vm = "spiffe://cluster.local/ns/vm/sa/vm-sa"
    chain, key = mesh_ca.workload(vm)
    (short_dir / "cert-chain.pem").write_bytes(chain)
    (short_dir / "key.pem").write_bytes(key)
    settings = upstream(
        istiod, short_dir, mesh_ca, client_cert=str(short_dir / "cert-chain.pem"), client_key=str(short_dir / "key.pem")
    )
    (short_dir / "istio-token").unlink()  # a rebooted VM: no token, only its provisioned certificate
    ca = client(settings)
    issued = await ca.sign(csr(), 3600)
    await ca.close()
    assert uri_sans(issued[0].encode()) == [vm]
    assert "authorization" not in istiod.metadata[-1]


async def test_expired_client_certificate_falls_back_to_the_token(
    istiod: FakeIstiod, short_dir: Path, mesh_ca: MeshCa
) -> None:
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    chain, key = mesh_ca.workload("spiffe://cluster.local/ns/vm/sa/vm-sa", datetime.timedelta(hours=1), yesterday)
    (short_dir / "cert-chain.pem").write_bytes(chain)
    (short_dir / "key.pem").write_bytes(key)
    settings = upstream(
        istiod, short_dir, mesh_ca, client_cert=str(short_dir / "cert-chain.pem"), client_key=str(short_dir / "key.pem")
    )
    ca = client(settings)
    issued = await ca.sign(csr(), 3600)
    await ca.close()
    assert uri_sans(issued[0].encode()) == [IDENTITY]


def test_server_name_rules() -> None:
    assert server_name("localhost:15012") == "istiod.istio-system.svc"
    assert server_name("istiod.istio-system.svc:15012") == "istiod.istio-system.svc"
    assert server_name("10.0.0.1:15012") == "10.0.0.1"
    assert server_name("[::1]:15012") == "::1"
    assert server_name("localhost:15012", "istiod.custom") == "istiod.custom"
