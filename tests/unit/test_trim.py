"""The idle trimmer: at most one trim a second, and always one after the last burst."""

from __future__ import annotations

import asyncio

from app import trim as trim_module
from app.trim import IdleTrimmer
from tests.helpers import wait_until_async


async def test_a_burst_of_idle_moments_gives_one_trim_now_and_one_after_it() -> None:
    interval_s = 0.5  # far longer than the burst (~50 ms, a few times that when loaded)
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    trimmer = IdleTrimmer(lambda: calls.append(loop.time()))
    trim_module.MIN_INTERVAL_S = interval_s
    try:
        for _ in range(5):  # idle, busy, idle... within the interval
            trimmer.idle()
            await asyncio.sleep(0.01)
        await wait_until_async(lambda: len(calls) >= 2, 10, "the trim after the interval")
        # One at once, one when the interval was over (not at the burst's other moments).
        assert len(calls) == 2 and calls[1] - calls[0] >= interval_s / 2, calls
        await asyncio.sleep(interval_s)  # long after the last trim...
        idle_at = loop.time()
        trimmer.idle()
        await wait_until_async(lambda: len(calls) == 3, 10, "a third trim")
        assert calls[2] - idle_at < interval_s / 2  # ...the next one comes at once
    finally:
        trim_module.MIN_INTERVAL_S = 1.0


def test_without_a_running_loop_nothing_happens() -> None:
    calls: list[int] = []
    IdleTrimmer(lambda: calls.append(1)).idle()
    assert calls == []
