"""InFlight: a retried call joins the run in flight; a caller giving up does not cancel it."""

from __future__ import annotations

import asyncio

import pytest

from cri_shim.concurrency import InFlight


async def test_second_call_joins_and_a_caller_that_gives_up_leaves_the_run_going() -> None:
    runs: InFlight[str] = InFlight()
    release = asyncio.Event()
    started = 0
    joined: list[str] = []

    async def work() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "pod-1"

    first = asyncio.create_task(runs.join("name", work))
    await asyncio.sleep(0)
    assert "name" in runs
    with pytest.raises(TimeoutError):  # kubelet's deadline passes
        await asyncio.wait_for(first, 0.01)
    retry = asyncio.create_task(runs.join("name", work, on_join=lambda: joined.append("x")))
    await asyncio.sleep(0)
    release.set()
    assert await retry == "pod-1"
    assert started == 1 and joined == ["x"]
    assert "name" not in runs and runs.running() == []


async def test_a_failed_run_is_forgotten_so_the_next_call_starts_afresh() -> None:
    runs: InFlight[int] = InFlight()
    attempts = 0

    async def flaky() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("first attempt fails")
        return attempts

    with pytest.raises(RuntimeError):
        await runs.join("k", flaky)
    assert await runs.join("k", flaky) == 2
