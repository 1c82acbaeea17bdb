"""Independent steps of one CRI call run at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def run_all(*steps: Awaitable[Any]) -> None:
    """Run `steps` concurrently and let every one finish before raising the first
    failure: a plain gather would leave the others running unobserved, and a
    cleanup half done is worse than one that reports its error at the end."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
