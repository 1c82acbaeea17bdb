"""Independent steps of one CRI call run at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterable
from typing import Any


async def run_all(*steps: Awaitable[Any]) -> None:
    """Run `steps` concurrently and let every one finish before raising the first
    failure: a plain gather would leave the others running unobserved, and a
    cleanup half done is worse than one that reports its error at the end."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel every task (except the caller's own), then wait for each to end:
    a task only cancelled may still be running its cleanup when we return.
    Their outcomes are dropped: this is teardown."""
    current = asyncio.current_task()
    others = [task for task in list(tasks) if task is not current]
    for task in others:
        task.cancel()
    for task in others:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
