"""A model version's admission places (Detector.acquire and release): several places for one
request (an image's tiles) are waited for in line, first come first served, with the model's
instant engine (no session: only the places are exercised)."""

from __future__ import annotations

import asyncio

import pytest

from app.config import Settings
from app.engine.instant import InstantEngine
from app.errors import Overloaded
from app.metrics import Metrics
from app.service import Detector


@pytest.fixture
def detector() -> Detector:
    settings = Settings(max_queue=4, instances=1, max_batch_size=1, decode_workers=1)
    engine = InstantEngine.load(settings)
    return Detector(engine, settings, Metrics().for_version(engine.info.name, 1))


async def test_a_request_of_several_places_waits_in_line_and_is_served_first(
        detector: Detector) -> None:
    total = detector.max_admitted
    await detector.acquire(total, 0)
    several = asyncio.ensure_future(detector.acquire(3, 5))
    await asyncio.sleep(0)
    one = asyncio.ensure_future(detector.acquire(1, 5))  # behind it in line
    await asyncio.sleep(0)
    detector.release(2)
    await asyncio.sleep(0)
    assert not several.done() and not one.done()  # 2 free: not enough for the first in line
    detector.release(1)
    await asyncio.wait_for(several, 5)
    assert not one.done()
    detector.release(1)
    await asyncio.wait_for(one, 5)
    detector.release(total - 4 + 3 + 1)
    await detector.acquire(total, 0)  # every place came back
    detector.release(total)


async def test_a_request_that_gives_up_leaves_its_places_to_the_next(detector: Detector
                                                                      ) -> None:
    total = detector.max_admitted
    await detector.acquire(total, 0)
    with pytest.raises(Overloaded):
        await detector.acquire(total + 1, 5)  # more than the model admits: never waits
    several = asyncio.ensure_future(detector.acquire(3, 0.05))
    await asyncio.sleep(0)
    one = asyncio.ensure_future(detector.acquire(1, 5))
    await asyncio.sleep(0)
    detector.release(1)
    with pytest.raises(Overloaded):
        await several  # out of time while one place was free: the one behind gets it
    await asyncio.wait_for(one, 5)
    cancelled = asyncio.ensure_future(detector.acquire(2, 5))
    await asyncio.sleep(0)
    cancelled.cancel()  # its client left while it waited
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    detector.release(total)
    await detector.acquire(total, 0)
    detector.release(total)
