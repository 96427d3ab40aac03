"""The idle trimmer: at most one trim a second, and always one after the last burst."""

from __future__ import annotations

import asyncio

from app import trim as trim_module
from app.trim import IdleTrimmer


async def test_a_burst_of_idle_moments_gives_one_trim_now_and_one_after_it() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    trimmer = IdleTrimmer(lambda: calls.append(loop.time()))
    trim_module.MIN_INTERVAL_S = 0.2
    try:
        for _ in range(5):  # idle, busy, idle... within the interval
            trimmer.idle()
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)
        assert len(calls) == 2  # one at once, one when the interval was over
        assert calls[1] - calls[0] >= 0.15
        trimmer.idle()
        await asyncio.sleep(0.05)
        assert len(calls) == 3  # long after the last: at once
    finally:
        trim_module.MIN_INTERVAL_S = 1.0


def test_without_a_running_loop_nothing_happens() -> None:
    calls: list[int] = []
    IdleTrimmer(lambda: calls.append(1)).idle()
    assert calls == []
