"""The test-support plumbing of the peers and the containerd matrix, without
running any peer: build.sh output, versions.env, critest's JUnit report, the
containerd config the private containerd gets for each major version."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri_shim.containerd.embedded import (
    CRI_PLUGIN,
    CRI_PLUGINS_V2,
    EmbeddedContainerd,
    EmbeddedContainerdError,
    render_config,
)
from tests.conformance.run_critest import parse_junit
from tests.support import peers
from tests.support.containerd_matrix import CONTAINERD_PEERS


def test_build_output_lines_are_parsed() -> None:
    out = (
        "CRICTL=/cache/cri-tools-v1.37.0/crictl\n"
        "CRITEST=/cache/cri-tools-v1.37.0/critest\n"
        "noise=relative/path\nOTHER=/x\n"
    )
    assert peers.parse_build_output(out) == {
        "CRICTL": "/cache/cri-tools-v1.37.0/crictl",
        "CRITEST": "/cache/cri-tools-v1.37.0/critest",
    }


def test_versions_come_from_versions_env() -> None:
    pinned = peers.versions()
    assert pinned["CRI_TOOLS_VERSION"].startswith("v1.")
    assert pinned["CONTAINERD2_VERSION"].startswith("v2.")
    # The matrix's 2.x entry is the pinned one, named without the "v".
    assert CONTAINERD_PEERS[1].version == pinned["CONTAINERD2_VERSION"].lstrip("v")
    assert CONTAINERD_PEERS[1].major == 2


def test_a_peer_named_in_the_environment_must_be_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "crictl"
    monkeypatch.setenv("CRICTL", str(missing))
    with pytest.raises(peers.PeerMissing, match=r"CRICTL=.* is not an executable file: set"):
        peers.peer_path("CRICTL")
    missing.write_text("#!/bin/sh\n")
    missing.chmod(0o755)
    assert peers.peer_path("CRICTL") == str(missing)


def test_junit_report_sorts_specs_by_outcome(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(
        '<?xml version="1.0" encoding="UTF-8"?><testsuites><testsuite name="CRI validation">'
        '<testcase name="[BeforeSuite]" status="passed"></testcase>'
        '<testcase name="[It] a passes" status="passed"></testcase>'
        '<testcase name="[It] b fails" status="failed"><failure message="x"></failure></testcase>'
        '<testcase name="[It] c is skipped" status="skipped"><skipped></skipped></testcase>'
        '<testcase name="[AfterSuite]" status="panicked"></testcase>'
        "</testsuite></testsuites>"
    )
    passed, failed, skipped = parse_junit(report)
    assert passed == ["[It] a passes"]
    assert failed == ["[It] b fails", "[AfterSuite]"]
    assert skipped == ["[It] c is skipped"]


def test_private_containerd_config_per_major_version(tmp_path: Path) -> None:
    one = render_config(tmp_path, 1)
    assert one.startswith("version = 2\n")
    assert f'disabled_plugins = ["{CRI_PLUGIN}"]' in one
    two = render_config(tmp_path, 2)
    assert two.startswith("version = 3\n")
    for plugin in (*CRI_PLUGINS_V2, "io.containerd.nri.v1.nri"):
        assert f'"{plugin}"' in two
    assert f'address = "{tmp_path / "containerd.sock"}"' in two


async def test_private_containerd_refuses_an_unsupported_version(tmp_path: Path) -> None:
    binary = tmp_path / "containerd"
    binary.write_text("#!/bin/sh\necho 'containerd github.com/containerd/containerd v1.5.18 x'\n")
    binary.chmod(0o755)
    daemon = EmbeddedContainerd(tmp_path / "c", binary=str(binary), restart=False)
    with pytest.raises(EmbeddedContainerdError, match=r"needs containerd 1\.6, 1\.7 or 2\.x"):
        await daemon.start()
    assert daemon.process is None
