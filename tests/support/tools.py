"""Prerequisites that deploy/setup-dev.sh installs: a missing one fails the
test with what to install, never skips it (a skip would hide the whole area)."""

from __future__ import annotations

import shutil

import pytest


def require_tool(name: str, package: str) -> str:
    """The path of `name`; fails the test when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is missing: install the Debian package {package} (deploy/setup-dev.sh does)",
            pytrace=False,
        )
    return path


__all__ = ["require_tool"]
