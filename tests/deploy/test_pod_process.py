"""The harness's containers: PID 1 of their own PID namespace, as the container's user, stopped the way kubelet
stops them. These are the properties the agent's end-to-end scenarios rely on."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.support.atomic_writer import format_map
from tests.support.container import ContainerProcess, Identity, RunningContainer
from tests.support.envoy import wait_until
from tests.support.kube_values import PodIdentity
from tests.support.pod import Image, Pod

pytestmark = pytest.mark.root
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture
def container(tmp_path: Path) -> Iterator[list[RunningContainer]]:
    require_root()
    started: list[RunningContainer] = []
    os.chmod(tmp_path, 0o755)
    yield started
    for process in started:
        process.kill()


ROOT_USER = Identity()


def _start(
    tmp_path: Path, argv: list[str], identity: Identity = ROOT_USER, netns: str | None = None
) -> ContainerProcess:
    return ContainerProcess(
        argv=argv,
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        identity=identity,
        netns=netns,
        log_path=tmp_path / "log",
    )


def test_pid1_without_a_sigterm_handler_is_killed_after_the_grace_period(
    tmp_path: Path, container: list[RunningContainer]
) -> None:
    # `sleep` installs no handler, and the kernel drops a signal to a namespace's init that has none: kubelet's
    # SIGTERM does nothing, the grace period runs out, SIGKILL ends it.
    process = _start(tmp_path, ["sh", "-c", "sleep 300 & exec sleep 300"])
    container.append(process)
    wait_until(lambda: len(process.processes()) == 2, timeout=5)
    result = process.terminate(grace_s=0.5, min_grace_s=0)
    assert result.killed
    assert result.signal == signal.SIGKILL
    assert 0.5 <= result.seconds < 3
    assert process.processes() == [], "every process of the PID namespace dies with its init"


def test_pid1_with_a_handler_exits_on_sigterm_with_its_own_code(
    tmp_path: Path, container: list[RunningContainer]
) -> None:
    process = _start(tmp_path, ["sh", "-c", "trap 'exit 7' TERM; sleep 300 & while :; do sleep 0.05; done"])
    container.append(process)
    time.sleep(0.2)  # let the shell install its trap
    result = process.terminate(grace_s=10, min_grace_s=0)
    assert not result.killed
    assert result.exit_code == 7
    assert result.seconds < 2
    assert process.processes() == [], "the background sleep died with PID 1"


def test_container_runs_as_its_user_with_its_capabilities_as_pid1(
    tmp_path: Path, container: list[RunningContainer]
) -> None:
    script = "echo $$; id -u; id -g; grep CapBnd /proc/self/status; cat /proc/1/comm"
    proxy = _start(tmp_path, ["sh", "-c", script], Identity(1337, 1337, ()))
    container.append(proxy)
    assert proxy.wait(10) == 0
    assert proxy.log_text().split() == ["1", "1337", "1337", "CapBnd:", "0000000000000000", "sh"]
    (tmp_path / "log").unlink()
    # istio-init: root, drop ALL, add NET_ADMIN (bit 12) and NET_RAW (bit 13).
    init = _start(
        tmp_path, ["sh", "-c", "id -u; grep CapBnd /proc/self/status"], Identity(0, 0, ("net_admin", "net_raw"))
    )
    container.append(init)
    assert init.wait(10) == 0
    assert init.log_text().split() == ["0", "CapBnd:", "0000000000003000"]


def test_read_only_root_leaves_only_the_writable_volumes_writable(
    tmp_path: Path, container: list[RunningContainer]
) -> None:
    volume = tmp_path / "istio-envoy"
    volume.mkdir(mode=0o777)
    volume.chmod(0o777)
    script = f"touch {volume}/ok && ! touch {tmp_path}/denied 2>/dev/null && echo done"
    process = ContainerProcess(
        # Root without capabilities: pytest's 0700 tmp directories stay reachable, only the mount flags decide.
        argv=["sh", "-c", script], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path, identity=Identity(0, 0, ()),
        netns=None, log_path=tmp_path / "log", read_only_root=True, writable=[volume],
    )  # fmt: skip
    container.append(process)
    assert process.wait(10) == 0, process.log_text()
    assert process.log_text().strip() == "done"
    assert (volume / "ok").exists()
    assert not (tmp_path / "denied").exists()
    (tmp_path / "host-still-writable").touch()  # the remount stayed inside the container's mount namespace


def test_exec_runs_inside_the_containers_namespaces(tmp_path: Path, container: list[RunningContainer]) -> None:
    process = _start(tmp_path, ["sleep", "300"], Identity(1337, 1337, ()))
    container.append(process)
    done = process.exec(["sh", "-c", "cat /proc/1/comm; id -u"], timeout=10)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["sleep", "1337"]
    # Its own /dev/shm, as a runtime gives each container: Envoy's shared memory stays inside the pod.
    marker = f"podh-{os.getpid()}"
    assert process.exec(["touch", f"/dev/shm/{marker}"], timeout=10).returncode == 0
    assert not Path(f"/dev/shm/{marker}").exists()
    process.terminate(grace_s=0.1, min_grace_s=0)


@pytest.mark.netns
def test_container_runs_in_the_given_network_namespace(tmp_path: Path, container: list[RunningContainer]) -> None:
    name = f"podh-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        process = _start(tmp_path, ["readlink", "/proc/self/ns/net"], Identity(1337, 1337, ()), netns=name)
        container.append(process)
        assert process.wait(10) == 0
        inode = os.stat(f"/run/netns/{name}").st_ino
        assert process.log_text().strip() == f"net:[{inode}]"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_pod_from_manifest_has_kubelets_volumes_env_and_argv(container: list[RunningContainer]) -> None:
    identity = PodIdentity(
        name="echo-sidecar-5d8f7b6c4-x7k2p",
        namespace="shop",
        labels={"app": "echo-sidecar", "version": "v1"},
        annotations={"proxy.istio.io/config": "concurrency: 2\n"},
        service_account="echo",
    )
    with Pod.from_manifest(
        DEPLOY / "sidecar.yaml",
        identity=identity,
        configmaps={"istio-ca-root-cert": {"root-cert.pem": "-----BEGIN CERTIFICATE-----\n"}},
        secrets={"istio.echo": {"cert-chain.pem": b"chain-1", "key.pem": b"key-1"}},
        images={"istio-proxy": Image(entrypoint=("sh", "-c"))},
    ) as pod:
        podinfo = pod.path("/etc/istio/pod")
        assert (podinfo / "labels").read_text() == format_map(identity.labels)
        assert (podinfo / "annotations").read_text() == 'proxy.istio.io/config="concurrency: 2\\n"'
        assert os.readlink(podinfo / "labels") == "..data/labels"
        assert oct(pod.path("/etc/istio/proxy").stat().st_mode & 0o777) == oct(0o777)
        env = pod.env("istio-proxy")
        assert env["POD_NAMESPACE"] == "shop"
        assert env["SERVICE_ACCOUNT"] == "echo"
        assert env["ISTIO_CPU_LIMIT"] == "2"
        assert env["INSTANCE_IP"] == identity.pod_ip
        argv = pod.argv("istio-proxy")
        assert argv[argv.index("--domain") + 1] == "shop.svc.cluster.local"
        # As the manifest's user (1337), relative paths from the image's `/` find the downward-API volume.
        proxy = pod.start("istio-proxy", ["sh", "-c", "id -u; cat ./etc/istio/pod/labels; touch ./etc/istio/proxy/x"])
        container.append(proxy)
        assert proxy.wait(10) == 0, proxy.log_text()
        assert proxy.log_text().split("\n", 1) == ["1337", format_map(identity.labels)]
        # A label change reaches the file by kubelet's ..data swap.
        before = os.readlink(podinfo / "..data")
        pod.update_metadata(labels={"app": "echo-sidecar", "version": "v2"})
        assert os.readlink(podinfo / "..data") != before
        assert 'version="v2"' in (podinfo / "labels").read_text()
        # A rotated Secret arrives the same way: one rename, both files of the new version at once.
        certs = pod.path("/etc/certs")
        assert (certs / "cert-chain.pem").read_bytes() == b"chain-1"
        before = os.readlink(certs / "..data")
        pod.update_secret("istio.echo", {"cert-chain.pem": b"chain-2", "key.pem": b"key-2"})
        assert os.readlink(certs / "..data") != before
        assert ((certs / "cert-chain.pem").read_bytes(), (certs / "key.pem").read_bytes()) == (b"chain-2", b"key-2")


def test_pod_deletion_stops_app_containers_before_native_sidecars(container: list[RunningContainer]) -> None:
    loop = 'trap "echo $NAME >> ./order; exit 0" TERM; while :; do sleep 0.05; done'

    def looping(name: str, **extra: object) -> dict[str, object]:
        env = [{"name": "NAME", "value": name}]
        return {"name": name, "command": ["sh", "-c", loop], "env": env, "securityContext": {"runAsUser": 0}, **extra}

    spec = {
        "initContainers": [looping("istio-proxy", restartPolicy="Always")],
        "containers": [looping("app"), looping("worker")],
        "terminationGracePeriodSeconds": 10,
    }
    with Pod({"labels": {"app": "x"}}, spec) as pod:
        for name in ("istio-proxy", "app", "worker"):
            container.append(pod.start(name))
        time.sleep(0.3)  # the traps are installed
        results = pod.delete()
        assert {name: r.exit_code for name, r in results.items()} == {"istio-proxy": 0, "app": 0, "worker": 0}
        order = (pod.root / "order").read_text().split()
    assert sorted(order[:2]) == ["app", "worker"], "the app containers are stopped together, first"
    assert order[2] == "istio-proxy", "the native sidecar only after them"
