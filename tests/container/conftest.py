"""The image, built once per test session from the Dockerfile (tests/support/image.py), and a runc runtime that
runs the manifests' pilot-agent containers from it (tests/support/runc.py): deploy/no-control-plane.yaml's, and
deploy/sidecar.yaml's joined to a real istiod (`tests/support/mesh_pod.py` `two_pods(..., runtime=runtime)`).
Both manifests name the same image.
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
