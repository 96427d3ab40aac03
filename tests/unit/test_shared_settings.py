"""The log and trace settings as the service's (FRONTENDS > 1): the engine process's
``TraceSettings`` and ``LogControl`` hold them, front ends follow them (app.tracing.follow,
app.api.v2_logging.LogControl.follow) keeping their counters unless an update started them
again, and a front end's change goes to its share, not to its own settings."""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from app.api.v2_logging import LogControl
from app.link.messages import RuntimeSettings
from app.tracing import Changes, InvalidSetting, TraceSettings, TraceValues, Tracing

ON = TraceValues("TIMESTAMPS", rate=2, count=3)


def _sampled(settings: TraceSettings, model: str | None, requests: int) -> list[bool]:
    return [settings.sampling(model).sample() for _ in range(requests)]


def test_a_front_end_keeps_its_counters_unless_an_update_starts_them_again() -> None:
    engine, front = TraceSettings(ON), TraceSettings(ON)
    front.follow(engine.config())
    assert _sampled(front, None, 2) == [False, True] and front.values().count == 2
    engine.update("m", {"trace_rate": 1})  # the model's own: the global counters go on
    front.follow(engine.config())
    assert front.values().count == 2 and front.values("m").count == 3
    assert _sampled(front, None, 2) == [False, True] and front.values().count == 1
    front.follow(engine.config())  # the same state again: nothing starts again
    assert front.values().count == 1
    engine.update(None, {"trace_count": 3})  # the same count, given again: counting restarts
    front.follow(engine.config())
    assert front.values().count == 3 and front.values() == engine.values()
    assert front.values("m") == TraceValues("TIMESTAMPS", 1, 3, 0)
    engine.update("m", {"trace_rate": None})  # cleared: the model follows the global again
    front.follow(engine.config())
    assert "m" not in front.models and front.updates == engine.updates == 3


def test_the_settings_cross_between_processes() -> None:
    engine = TraceSettings(ON)
    engine.update("m", {"trace_level": "OFF"})
    runtime = RuntimeSettings(1, LogControl("text").current, engine.config())
    assert pickle.loads(pickle.dumps(runtime)) == runtime


class Share:
    def __init__(self) -> None:
        self.changes: list[tuple[str, str | None, dict[str, Any]]] = []

    async def change_trace(self, model: str | None, changes: Changes) -> None:
        self.changes.append(("trace", model, changes))

    async def change_log(self, changes: dict[str, Any]) -> None:
        self.changes.append(("log", None, changes))


@pytest.fixture
def root_level() -> Iterator[None]:
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def test_a_front_ends_change_goes_to_its_share_once_checked(root_level: None) -> None:
    tracing, control, share = Tracing(ON), LogControl("json"), Share()
    tracing.share = control.share = share
    before = control.current
    asyncio.run(tracing.change("m", {"trace_rate": ["5"]}))
    asyncio.run(control.change({"log_info": False, "log_file": None}))
    assert share.changes == [("trace", "m", {"trace_rate": 5}), ("log", None,
                                                                 {"log_info": False})]
    # Nothing changes here until the engine process's state says so (``follow``).
    assert tracing.settings.values("m") == ON and control.current == before
    with pytest.raises(InvalidSetting, match="trace_rate"):
        asyncio.run(tracing.change(None, {"trace_rate": ["0"]}))
    assert len(share.changes) == 2


def test_a_front_end_follows_the_level_and_keeps_its_own_format(root_level: None) -> None:
    control = LogControl("json")
    settings = control.current
    control.follow(type(settings)("", False, True, True, 0, "default"))
    assert (control.current.log_info, control.current.log_format) == (False, "json")
    assert logging.getLogger().level == logging.WARNING
