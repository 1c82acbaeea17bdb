"""The one error the OCI spec builders raise.

Kept apart from the builders so the CRI handlers can map it to
INVALID_ARGUMENT without importing either builder.
"""

from __future__ import annotations


class SpecError(ValueError):
    """The CRI config asks for something that cannot be expressed; INVALID_ARGUMENT."""
