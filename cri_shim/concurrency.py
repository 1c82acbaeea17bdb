"""Independent steps of one CRI call run at once; a retried call joins the first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


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


async def stop_task(task: asyncio.Future[Any] | None) -> None:
    """Cancel one background task and wait until it has ended (its cleanup done);
    an error other than the cancellation still surfaces."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class InFlight(Generic[T]):
    """Runs in flight by key (a pod or container name, an image): a second call
    with the same key joins the first run instead of starting another, and a
    caller that gives up (kubelet's timeout) does not cancel the run, which
    finishes and is handed to the retry. RunPodSandbox, CreateContainer and
    PullImage all work this way."""

    def __init__(self) -> None:
        self._runs: dict[str, asyncio.Task[T]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._runs

    def __len__(self) -> int:
        return len(self._runs)

    def running(self) -> list[asyncio.Task[T]]:
        """Runs still working (their callers may be gone): shutdown awaits or cancels them."""
        return list(self._runs.values())

    async def join(
        self,
        key: str,
        start: Callable[[], Coroutine[Any, Any, T]],
        *,
        on_join: Callable[[], None] | None = None,
        name: str | None = None,
    ) -> T:
        """The result of `key`'s run in flight, or of `start()` begun now; shielded."""
        task = self._runs.get(key)
        if task is None:
            task = asyncio.create_task(start(), name=name)
            self._runs[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        elif on_join is not None:
            on_join()
        return await asyncio.shield(task)

    def _forget(self, key: str, done: asyncio.Task[T]) -> None:
        if self._runs.get(key) is done:
            del self._runs[key]
        if not done.cancelled():
            done.exception()  # retrieved here: the caller that would have may be gone
