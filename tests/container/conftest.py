"""The image, built once per test session from the Dockerfile (tests/support/image.py), and a runc runtime that
runs deploy/no-control-plane.yaml's pilot-agent containers from it (tests/support/runc.py).

Joining the mesh from the container (issue 16, item 4) plugs in here once the agent has its xDS proxy and SDS
server: the same `runtime` runs deploy/sidecar.yaml's pod (`Pod(meta, spec, runtime=runtime, configmaps=
{"istio-ca-root-cert": ...})`, its token and CA volumes bind-mounted like the others), with the standalone istiod
listening on the node side of the veth (`net.client_ip`) and the pod's `DISCOVERY_ADDRESS`/`CA_ADDR` pointing there.
"""

from __future__ import annotations

import os

import pytest

from tests.support.image import BuildError, BuiltImage, build_image
from tests.support.pod_run import manifest_pod
from tests.support.runc import RuncRuntime, missing_tools


def manifest_image() -> str:
    """The `image:` deploy/no-control-plane.yaml gives istio-init and istio-proxy (the same one)."""
    _configmap, _meta, spec = manifest_pod()
    images = {c["image"] for c in spec["initContainers"] + spec["containers"] if c["name"].startswith("istio-")}
    assert len(images) == 1, images
    return str(images.pop())


@pytest.fixture(scope="session")
def image() -> BuiltImage:
    if os.geteuid() != 0:
        pytest.skip("building and running the image needs root")
    if missing := missing_tools():
        pytest.skip(f"not installed: {', '.join(missing)} (.ci/run installs them)")
    try:
        return build_image()
    except BuildError as exc:
        pytest.fail(f"the image did not build: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def runtime(image: BuiltImage) -> RuncRuntime:
    return RuncRuntime({manifest_image(): image})
