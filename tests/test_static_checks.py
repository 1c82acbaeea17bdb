"""Lint, types and generated-code freshness, as part of the one test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_ruff_is_clean() -> None:
    result = run(str(BIN / "ruff"), "check", "cri_shim", "tests", "protos/generate.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied() -> None:
    result = run(str(BIN / "ruff"), "format", "--check", "cri_shim", "tests", "protos/generate.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    """The product and its tests (fixtures, helpers, benchmarks) alike."""
    result = run(str(BIN / "mypy"), "-p", "cri_shim", "-p", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_matches_protos() -> None:
    result = run(sys.executable, "protos/generate.py", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
