"""Trace settings (app.tracing): Triton's sampling rule, counts, model settings over the global
ones, parsing of updates; the clock conversion; and nothing of OpenTelemetry when off."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from app.errors import ModelLoadError, ServiceError, Unsupported
from app.tracing import (
    InvalidSetting,
    TraceSettings,
    TraceValues,
    Tracing,
    _Clock,
    parse_changes,
)

ON = TraceValues("TIMESTAMPS", rate=1, count=-1)


def _sampled(settings: TraceSettings, model: str | None, requests: int) -> list[bool]:
    return [settings.sampling(model).sample() for _ in range(requests)]


def test_the_nth_request_of_every_rate_is_traced_while_the_count_lasts() -> None:
    settings = TraceSettings(TraceValues("TIMESTAMPS", rate=3, count=2))
    assert _sampled(settings, None, 9) == [False, False, True, False, False, True,
                                           False, False, False]
    assert settings.values().count == 0 and not settings.on
    assert not TraceSettings(TraceValues()).on  # OFF


def test_a_model_takes_what_it_was_not_given_from_the_global_setting() -> None:
    settings = TraceSettings(TraceValues())
    settings.update("m", {"trace_level": "TIMESTAMPS"})
    assert settings.on and settings.values("m") == TraceValues("TIMESTAMPS", 1000, -1, 0)
    assert settings.values().level == "OFF" and settings.values("other").level == "OFF"
    settings.update(None, {"trace_rate": 2, "trace_count": 5})
    assert settings.values("m") == TraceValues("TIMESTAMPS", 2, 5, 0)
    assert _sampled(settings, "m", 4) == [False, True, False, True]
    assert settings.values("m").count == 3 and settings.values().count == 5
    settings.update("m", {"trace_rate": 1})
    settings.update(None, {"trace_rate": 7})  # the model keeps its own rate
    assert settings.values("m").rate == 1
    settings.update("m", {"trace_level": None, "trace_rate": None})  # all cleared: global
    assert "m" not in settings.models and settings.values("m") == settings.values()


def test_clearing_a_global_value_restores_its_start_value() -> None:
    settings = TraceSettings(TraceValues("TIMESTAMPS", rate=10, count=-1))
    settings.update(None, {"trace_rate": 2, "log_frequency": 3})
    settings.update(None, {"trace_rate": None, "log_frequency": None})
    assert settings.values() == TraceValues("TIMESTAMPS", 10, -1, 0)


@pytest.mark.parametrize(("raw", "typed"), [
    ({"trace_level": ["timestamps"]}, {"trace_level": "TIMESTAMPS"}),
    ({"trace_level": ["OFF"], "trace_rate": ["4294967295"]},
     {"trace_level": "OFF", "trace_rate": 4294967295}),
    ({"trace_count": ["-1"], "log_frequency": ["0"]}, {"trace_count": -1, "log_frequency": 0}),
    ({"trace_rate": None, "trace_level": []}, {"trace_rate": None, "trace_level": None}),
    ({"trace_mode": ["opentelemetry"]}, {}),
])
def test_updates_parse(raw: dict[str, list[str] | None], typed: dict[str, object]) -> None:
    assert parse_changes(raw, "") == typed


@pytest.mark.parametrize(("raw", "error"), [
    ({"trace_rate": ["0"]}, InvalidSetting),
    ({"trace_rate": ["4294967296"]}, InvalidSetting),
    ({"trace_rate": ["1", "2"]}, InvalidSetting),
    ({"trace_rate": ["1e3"]}, InvalidSetting),
    ({"trace_count": ["-2"]}, InvalidSetting),
    ({"trace_count": ["2147483648"]}, InvalidSetting),
    ({"trace_level": ["OFF", "TIMESTAMPS"]}, InvalidSetting),
    ({"trace_level": ["SOMETIMES"]}, InvalidSetting),
    ({"trace_level": ["TIMESTAMPS", "TENSORS"]}, Unsupported),
    ({"trace_file": ["x.json"]}, Unsupported),
    ({"url": ["http://x:4318/v1/traces"]}, Unsupported),
    ({"trace_mode": ["triton"]}, InvalidSetting),
    ({"colour": ["blue"]}, InvalidSetting),
])
def test_bad_updates_are_refused(raw: dict[str, list[str] | None],
                                 error: type[ServiceError]) -> None:
    with pytest.raises(error):
        parse_changes(raw, "")
    assert InvalidSetting.status == 422 and Unsupported.status == 501


def test_an_update_is_all_or_nothing() -> None:
    tracing = Tracing(ON)
    with pytest.raises(InvalidSetting):
        tracing.update(None, {"trace_rate": ["5"], "trace_count": ["-9"]})
    assert tracing.settings.values() == ON


def test_without_an_endpoint_nothing_is_traced_and_the_report_says_so() -> None:
    tracing = Tracing(ON)
    assert not tracing.active
    assert tracing.begin("POST /detect", None, {}, time.perf_counter()) is None
    assert tracing.report() == {
        "trace_level": ["TIMESTAMPS"], "trace_rate": ["1"], "trace_count": ["-1"],
        "log_frequency": ["0"], "trace_mode": ["opentelemetry"], "url": [""]}


def test_perf_counter_times_become_epoch_nanoseconds() -> None:
    clock = _Clock()
    for _ in range(3):
        before = time.time_ns()
        converted = clock.ns(time.perf_counter())
        after = time.time_ns()
        assert before - 1_000_000 <= converted <= after + 1_000_000
    assert clock.ns(1.5) - clock.ns(1.0) == 500_000_000


def test_off_imports_no_opentelemetry() -> None:
    """The service without OTLP_ENDPOINT never loads the SDK (its import, its threads)."""
    code = ("import sys; from app.config import Settings; from app.tracing import Tracing; "
            "t = Tracing.from_settings(Settings(trace_level='timestamps')); "
            "print(t.active, any(m.startswith('opentelemetry.sdk') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.split() == ["False", "False"]


def test_an_endpoint_that_is_no_url_is_refused_at_start() -> None:
    with pytest.raises(ModelLoadError, match="OTLP_ENDPOINT"):
        Tracing(ON, "otel-collector:4318")
