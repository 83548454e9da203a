"""The documentation a user follows stays true: every relative link and anchor in the Markdown files resolves, and
every metric and exit code the agent has is in the reference's table, once (env vars: tests/config)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.errors import ExitCode
from tests.support.agent_metrics import declared_families

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference.md"
DOCS = sorted([REPO / "README.md", REPO / "CHANGELOG.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md")])
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert broken == []


def reference_table(section: str) -> list[list[str]]:
    """The rows (cells) of the first table under the reference's `## <section>` heading."""
    rows: list[list[str]] = []
    current = ""
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        elif current == section and line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current == section and rows:
            break
    return [row for row in rows[2:]]


def test_every_agent_metric_is_in_the_reference_once() -> None:
    exposed = {name for name in declared_families() if not name.startswith("istio_agent_process_")}
    documented = [re.findall(r"`([^`]+)`", row[0])[0] for row in reference_table("Metrics")]
    assert sorted(set(documented) - {"istio_agent_process_*"}) == sorted(exposed)
    assert len(documented) == len(set(documented))


def test_every_exit_code_is_in_the_reference_once() -> None:
    documented = [row[1].strip("`") for row in reference_table("Exit codes") if row[1]]
    assert sorted(documented) == sorted(code.name for code in ExitCode)
