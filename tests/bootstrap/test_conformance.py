"""Istio's bootstrap golden files (TestGolden), rendered by this project's template and compared as parsed JSON.

Inputs per case come from ../shared/conformance/bootstrap/cases.json: the `.proxycfg` (parsed here from prototext,
with the Go test's overrides), the env list, the annotation file, the fixed metadata options. The output is
normalised exactly as Istio's test does and compared with the golden as JSON trees; like Istio, stats_matcher is
checked separately against the expected pattern lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.bootstrap import write_bootstrap
from agent.config.schema import normalise_proxy_config, prune_defaults
from tests.bootstrap import prototext
from tests.bootstrap.golden import (
    comparable,
    differences,
    golden_proxy_config,
    load_cases,
    render_case,
    stats_matcher_lists,
)
from tests.support.conformance import CONFORMANCE_DIR, conformance_dir

pytestmark = pytest.mark.conformance

_DATA = CONFORMANCE_DIR / "bootstrap"
CASES = load_cases(_DATA) if (_DATA / "cases.json").is_file() else []


def proxycfg_input(directory: Path, case: dict[str, Any]) -> dict[str, Any]:
    """The case's ProxyConfig as the Go test builds it: prototext, then its overrides."""
    raw = prototext.parse((directory / case["proxycfg"]).read_text())
    overrides = case["proxycfg_overrides"]
    if not raw.get("status_port"):
        raw["status_port"] = overrides["status_port"]
    raw["proxy_metadata"] = overrides["proxy_metadata"]
    return normalise_proxy_config(raw, case["proxycfg"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden(case: dict[str, Any], tmp_path: Path) -> None:
    directory = conformance_dir("bootstrap")
    rendered = render_case(directory, case, tmp_path, proxycfg_input(directory, case))
    generated = json.loads(rendered.text)
    golden = json.loads((directory / case["golden"]).read_text())

    assert stats_matcher_lists(generated) == case["expected_stats_matcher"]
    diffs = differences(comparable(golden), comparable(generated))
    assert not diffs, "\n".join(diffs)

    write_bootstrap(rendered.cfg, rendered.text.encode())
    token = Path(rendered.cfg.proxy.config_path) / "lightstep_access_token.txt"
    assert token.exists() == case["expect_lightstep_access_token_file"]
    if token.exists():
        assert token.read_text() == rendered.cfg.proxy.tracing["lightstep"]["accessToken"]  # type: ignore[index]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_proxycfg_parses_to_golden_proxy_config(case: dict[str, Any]) -> None:
    """Our reading of each .proxycfg equals the golden's PROXY_CONFIG metadata (the Go test's proto-JSON)."""
    directory = conformance_dir("bootstrap")
    ours = prune_defaults(proxycfg_input(directory, case))
    golden = golden_proxy_config(directory, case)
    for key in ("configPath", "customConfigFile"):
        ours.pop(key, None)
        golden.pop(key)
    assert ours == golden


def _passes(directory: Path, case: dict[str, Any], tmp: Path) -> bool:
    try:
        rendered = render_case(directory, case, tmp, proxycfg_input(directory, case))
    except Exception:
        return False
    generated = json.loads(rendered.text)
    golden = json.loads((directory / case["golden"]).read_text())
    return stats_matcher_lists(generated) == case["expected_stats_matcher"] and not differences(
        comparable(golden), comparable(generated)
    )


def test_summary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Counts passing cases on its own (independent of test order) and prints "bootstrap conformance: N/29"."""
    directory = conformance_dir("bootstrap")
    passed = 0
    for i, case in enumerate(CASES):
        (tmp_path / str(i)).mkdir()
        passed += _passes(directory, case, tmp_path / str(i))
    line = f"bootstrap conformance: {passed}/{len(CASES)}"
    with capsys.disabled():
        print(f"\n{line}")
    assert len(CASES) == 29
    assert passed == len(CASES), line
