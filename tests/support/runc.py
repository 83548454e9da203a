"""The image run the way a container runtime runs it: runc, an OCI bundle, the process PID 1 of new namespaces.

`RuncRuntime` plugs into the pod harness (`Pod(..., runtime=RuncRuntime({image_name: built}))`): a container whose
`image:` it knows is started from that image instead of from the host's filesystem. Per container, as containerd
does it: a writable layer of its own over the image (`buildah from` + `buildah mount`), an OCI spec (`oci_spec`,
pure) and `runc run` in the foreground, whose exit status is the container's (128 + n when a signal n ended it, as
kubelet reports too).

The spec follows what containerd makes of a pod's container: the image's ENV and ENTRYPOINT under the pod's env and
args (the harness's `Pod.env`/`Pod.argv`), `runAsUser`/`runAsGroup`, the capabilities left by `drop: [ALL]` and
`add` (bounding, effective and permitted; none inheritable or ambient), `noNewPrivileges` from
`allowPrivilegeEscalation: false`, `readOnlyRootFilesystem` as a read-only root, every volumeMount a bind mount of
the harness's volume directory (so kubelet's `..data` swaps show through), the pod's network namespace (a path),
new PID, mount, IPC and UTS namespaces with the pod's name as hostname, a private /dev/shm, and no `rlimits`
(runc cannot set them on these machines). Not reproduced: seccomp and AppArmor profiles, cgroup resource limits.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.container import Identity, RunningContainer, Termination, netns_path
from tests.support.image import BuiltImage
from tests.support.pod import Image, Pod

_DEFAULT_MOUNTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    # Envoy's hot-restart shared memory lives here: each container has its own, as under containerd.
    {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777"],
    },
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
]
# containerd's default set, what a container keeps when its securityContext drops nothing.
DEFAULT_CAPABILITIES = (
    "chown", "dac_override", "fsetid", "fowner", "mknod", "net_raw", "setgid", "setuid", "setfcap", "setpcap",
    "net_bind_service", "sys_chroot", "kill", "audit_write",
)  # fmt: skip
_MASKED = ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/sched_debug"]
_READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


# How Istio runs istio-proxy: uid/gid 1337, every capability dropped.
ISTIO_PROXY = Identity(1337, 1337, ())


@dataclass(frozen=True)
class Mount:
    source: Path
    destination: str
    read_only: bool = False


def oci_spec(
    *,
    rootfs: Path,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    identity: Identity,
    no_new_privileges: bool,
    read_only_root: bool,
    mounts: Sequence[Mount],
    netns: Path | None,
    hostname: str,
) -> dict[str, Any]:
    """The OCI runtime spec (config.json) of one container; `netns` None: a new, empty network namespace."""
    kept = DEFAULT_CAPABILITIES if identity.capabilities is None else identity.capabilities
    caps = [f"CAP_{c.upper()}" for c in kept]
    binds = [
        {
            "destination": m.destination.rstrip("/") or "/",
            "type": "bind",
            "source": str(m.source),
            "options": ["rbind", "nosuid", "nodev", "ro" if m.read_only else "rw"],
        }
        for m in mounts
    ]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": identity.uid, "gid": identity.gid},
            "args": list(argv),
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd or "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "inheritable": [], "ambient": []},
            "noNewPrivileges": no_new_privileges,
        },
        "root": {"path": str(rootfs), "readonly": read_only_root},
        "hostname": hostname,
        "mounts": [*_DEFAULT_MOUNTS, *binds],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", **({"path": str(netns)} if netns else {})},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "maskedPaths": _MASKED,
            "readonlyPaths": _READ_ONLY,
        },
    }


def pod_image(image: BuiltImage) -> Image:
    """What the pod harness needs to know of the built image: ENTRYPOINT, ENV, USER."""
    return Image(entrypoint=image.entrypoint, env=dict(image.env), user=int(image.user.split(":")[0]), programs={})


class RuncContainer(RunningContainer):
    """One container of the image under `runc run`. `signal()` is `runc kill`, `exec()` is `runc exec` (the
    container's user, env and capabilities). `close()` removes the writable layer."""

    def __init__(self, image: BuiltImage, spec: Mapping[str, Any], bundle: Path, log_path: Path) -> None:
        self.id = f"pa-{secrets.token_hex(4)}"
        self.log_path = log_path
        self.bundle = bundle
        preparing = time.monotonic()
        self._layer = _buildah("from", "--quiet", "--name", self.id, image.id)
        try:
            rootfs = Path(_buildah("mount", self._layer))
            self.prepare_seconds = time.monotonic() - preparing  # the writable layer, before `runc run`
            bundle.mkdir(parents=True, exist_ok=True)
            config = {**spec, "root": {**spec["root"], "path": str(rootfs)}}
            (bundle / "config.json").write_text(json.dumps(config, indent=1))
            pid_file = bundle / "pid"
            command = ["runc", "run", "--bundle", str(bundle), "--pid-file", str(pid_file), self.id]
            self.started_at = time.monotonic()
            with log_path.open("ab") as log:
                self._popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.pid1 = self._wait_for_pid1(pid_file)
            self.pid_ns = self._read_pid_ns()
        except BaseException:
            self.close()
            raise

    def _wait_for_pid1(self, pid_file: Path, timeout: float = 10.0) -> int | None:
        """The host pid of PID 1 once it runs the image's command (not `runc init` any more); None when the
        container was over before that could be seen (a quick init container)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int(pid_file.read_text())
                try:
                    if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"runc\0init"):
                        return pid
                except (FileNotFoundError, ProcessLookupError):
                    return None
            if self._popen.poll() is not None:
                return None
            time.sleep(0.002)
        raise RuntimeError(f"runc did not start container {self.id}: {self.log_text()[-2000:]}")

    def signal(self, sig: int) -> None:
        if self.running():
            subprocess.run(["runc", "kill", self.id, str(int(sig))], capture_output=True, check=False, timeout=10)

    def exec(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        if not self.running():
            raise RuntimeError("the container is not running")
        return subprocess.run(["runc", "exec", self.id, *argv], capture_output=True, timeout=timeout, check=False)

    def _decode_exit(self, code: int, start: float, killed: bool) -> Termination:
        # runc reports a death by signal n as 128 + n, like kubelet's exitCode; the signal is only known for sure
        # when the harness sent SIGKILL itself.
        return Termination(code, 9 if killed else None, killed, time.monotonic() - start)

    def close(self) -> None:
        self.kill()
        subprocess.run(["runc", "delete", "--force", self.id], capture_output=True, check=False, timeout=10)
        subprocess.run(["buildah", "rm", self.id], capture_output=True, check=False, timeout=30)


class RuncRuntime:
    """The pod harness's runtime for containers of built images: `images` maps a manifest's `image:` to them."""

    def __init__(self, images: Mapping[str, BuiltImage]) -> None:
        self.images = dict(images)

    def image(self, reference: str) -> Image:
        return pod_image(self._built(reference))

    def _built(self, reference: str) -> BuiltImage:
        if reference not in self.images:
            raise KeyError(f"image {reference} was not built for this test (have: {sorted(self.images)})")
        return self.images[reference]

    def start(
        self, pod: Pod, name: str, *, argv: Sequence[str], env: Mapping[str, str], identity: Identity,
        read_only_root: bool, log_path: Path,
    ) -> RuncContainer:  # fmt: skip
        container = pod.container_spec(name)
        assert pod.netns is not None, "a runc container joins the pod's network namespace"
        netns = netns_path(pod.netns)
        assert netns is not None
        built = self._built(str(container["image"]))
        mounts = [
            Mount(pod.path(m["mountPath"]).resolve(), str(m["mountPath"]), bool(m.get("readOnly")))
            for m in container.get("volumeMounts") or []
        ]
        if pod.resolv_conf is not None:
            mounts.append(Mount(pod.resolv_conf, "/etc/resolv.conf", True))
        context = container.get("securityContext") or {}
        spec = oci_spec(
            rootfs=Path("/"),  # replaced by the container's own layer
            argv=argv,
            env=env,
            cwd=built.workdir,
            identity=identity,
            no_new_privileges=context.get("allowPrivilegeEscalation") is False,
            read_only_root=read_only_root,
            mounts=mounts,
            netns=netns,
            hostname=pod.identity.name,
        )
        return RuncContainer(built, spec, pod.root / ".runc" / name, log_path)


def run_image(
    image: BuiltImage, argv: Sequence[str], workdir: Path, *, identity: Identity = ISTIO_PROXY,
    read_only_root: bool = True, timeout: float = 60.0,
) -> tuple[int, str]:  # fmt: skip
    """`argv` in a container of the image, alone (no pod, no network): its exit code and output. By default as
    Istio runs istio-proxy: uid/gid 1337, no capabilities, no privilege escalation, read-only root."""
    spec = oci_spec(
        rootfs=Path("/"), argv=argv, env=image.env, cwd=image.workdir, identity=identity, no_new_privileges=True,
        read_only_root=read_only_root, mounts=(), netns=None, hostname="image-test",
    )  # fmt: skip
    token = secrets.token_hex(3)
    container = RuncContainer(image, spec, workdir / f"bundle-{token}", workdir / f"output-{token}.log")
    try:
        code = container.wait(timeout)
    finally:
        container.close()
    return code, container.log_text()


def _buildah(*args: str) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"buildah {args[0]}: {done.stderr.strip()}")
    return done.stdout.strip()


def missing_tools() -> list[str]:
    """What this machine lacks to build and run the image (CI's .ci/run installs them)."""
    return [tool for tool in ("runc", "buildah", "mmdebstrap") if shutil.which(tool) is None]
