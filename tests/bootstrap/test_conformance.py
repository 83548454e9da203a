"""Istio's bootstrap golden files (TestGolden), rendered by this project's template and compared as parsed JSON.

Goldens and `.proxycfg` inputs are read from Istio's module at the pinned version (pkg/bootstrap/testdata); the rest
of each case's inputs is Istio's test table in istio_golden_cases.yaml (tests/bootstrap/golden.py builds them). The
output is normalised exactly as Istio's test does and compared with the golden as JSON trees; like Istio,
stats_matcher is checked separately against the expected pattern lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.bootstrap import write_bootstrap
from agent.config.schema import prune_defaults
from tests.bootstrap.golden import (
    GoldenCase,
    comparable,
    differences,
    golden_json,
    golden_proxy_config,
    istio_testdata,
    load_cases,
    proxycfg_input,
    render_case,
    stats_matcher_lists,
)

pytestmark = pytest.mark.conformance

CASES = load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden(case: GoldenCase, tmp_path: Path) -> None:
    rendered = render_case(case, tmp_path, proxycfg_input(case))
    generated = json.loads(rendered.text)

    assert stats_matcher_lists(generated) == case.expected_stats_matcher
    diffs = differences(comparable(golden_json(case)), comparable(generated))
    assert not diffs, "\n".join(diffs)

    write_bootstrap(rendered.cfg, rendered.text.encode())
    token = Path(rendered.cfg.proxy.config_path) / "lightstep_access_token.txt"
    assert token.exists() == case.expect_lightstep_access_token
    if token.exists():
        assert token.read_text() == rendered.cfg.proxy.tracing["lightstep"]["accessToken"]  # type: ignore[index]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_proxycfg_parses_to_golden_proxy_config(case: GoldenCase) -> None:
    """Our reading of each .proxycfg equals the golden's PROXY_CONFIG metadata (the Go test's proto-JSON)."""
    ours = prune_defaults(proxycfg_input(case))
    golden = golden_proxy_config(case)
    for key in ("configPath", "customConfigFile"):
        ours.pop(key, None)
        golden.pop(key)
    assert ours == golden


def test_every_istio_golden_has_a_case() -> None:
    """A golden added to (or dropped from) Istio at a new pin shows up here until istio_golden_cases.yaml follows.

    legacy_stats_tags_regex has a .proxycfg and a golden in testdata but no row in Istio's own table."""
    goldens = {path.name.removesuffix("_golden.json") for path in istio_testdata().glob("*_golden.json")}
    assert goldens - {case.name for case in CASES} == {"legacy_stats_tags_regex"}
    assert {case.name for case in CASES} <= goldens


def _passes(case: GoldenCase, tmp: Path) -> bool:
    try:
        rendered = render_case(case, tmp, proxycfg_input(case))
    except Exception:
        return False
    generated = json.loads(rendered.text)
    return stats_matcher_lists(generated) == case.expected_stats_matcher and not differences(
        comparable(golden_json(case)), comparable(generated)
    )


def test_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Counts passing cases on its own (independent of test order) and prints "bootstrap conformance: N/27"."""
    passed = 0
    for i, case in enumerate(CASES):
        (tmp_path / str(i)).mkdir()
        passed += _passes(case, tmp_path / str(i))
    line = f"bootstrap conformance: {passed}/{len(CASES)}"
    with capsys.disabled():
        print(f"\n{line}")
    assert len(CASES) == 27
    assert passed == len(CASES), line
