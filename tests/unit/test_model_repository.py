"""The model repository's scan and the registry's changes, on tiny real ONNX models run by
the real onnxruntime (no HTTP: app.registry knows none)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from app.api.keys import authorize, authorize_control
from app.config import Settings, parse_input_size
from app.errors import Conflict, Forbidden, InvalidRequest, LoadFailed, NotFound, Unauthorized
from app.metrics import Metrics
from app.model_repository import VersionPolicy, check_name, parse_version, scan
from app.registry import ModelRegistry
from tests import onnx_models


def _version(root: Path, name: str, version: int | str, **kwargs: object) -> Path:
    directory = root / name / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    return onnx_models.official(directory / "model.onnx", **kwargs)  # type: ignore[arg-type]


def _settings(root: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"model_repository": root, "providers": "cpu",
                                 "model_control": "explicit", **overrides}
    return Settings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(("policy", "available", "wanted"), [
    ({"latest": {"num_versions": 1}}, [1, 3, 2], [3]),
    ({"latest": {"num_versions": 2}}, [1, 3, 2], [2, 3]),
    ({"all": {}}, [2, 1], [1, 2]),
    ({"specific": {"versions": [1, 5]}}, [1, 2, 3], [1]),
])
def test_version_policies_select_as_triton_does(policy: dict[str, object], available: list[int],
                                                wanted: list[int]) -> None:
    assert VersionPolicy.parse(policy).select(available) == wanted


@pytest.mark.parametrize("policy", [
    {"latest": {"num_versions": 0}}, {"latest": {"num_versions": True}}, {"any": {}},
    {"specific": {"versions": []}}, {"specific": {"versions": [0]}}, "latest", {},
    {"all": {}, "latest": {}},
])
def test_a_malformed_version_policy_is_refused(policy: object) -> None:
    with pytest.raises(ValueError, match="version_policy"):
        VersionPolicy.parse(policy)


def test_a_scan_finds_versions_and_skips_what_is_not_one(tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    _version(tmp_path, "a", 3)
    (tmp_path / "a" / "2").mkdir()  # being copied in: no model.onnx yet
    (tmp_path / "a" / "2" / "model.onnx.tmp").write_bytes(b"partial")
    (tmp_path / "a" / "latest").mkdir()  # not a version
    (tmp_path / "a" / "0").mkdir()
    (tmp_path / ".hidden").mkdir()  # not a plain name
    (tmp_path / "notes.txt").write_text("a file, not a model")
    entries = scan(_settings(tmp_path), tmp_path)
    assert list(entries) == ["a"]
    assert sorted(entries["a"].versions) == [1, 3] and entries["a"].wanted == (3,)


def test_per_model_settings_and_labels_apply_to_that_model_only(tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    _version(tmp_path, "b", 1)
    (tmp_path / "a" / "settings.json").write_text(json.dumps(
        {"max_batch_size": 2, "score_threshold": 0.25, "version_policy": {"all": {}}}))
    (tmp_path / "a" / "labels.txt").write_text("cat\ndog\n")
    entries = scan(_settings(tmp_path, max_batch_size=4), tmp_path)
    a, b = entries["a"].settings, entries["b"].settings
    assert a is not None and b is not None
    assert (a.max_batch_size, a.score_threshold, a.labels_path) == (
        2, 0.25, tmp_path / "a" / "labels.txt")
    assert (b.max_batch_size, b.score_threshold, b.labels_path) == (4, 0.5, None)


@pytest.mark.parametrize(("text", "error"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "a JSON object"),
    ('{"api_key": "x"}', "cannot be set per model"),
    ('{"max_batch_size": -1}', "max_batch_size"),
    ('{"input_size": "100x100"}', "multiple of 32"),
])
def test_a_bad_settings_file_is_the_models_error_not_the_services(
        tmp_path: Path, text: str, error: str) -> None:
    _version(tmp_path, "bad", 1)
    _version(tmp_path, "good", 1)
    (tmp_path / "bad" / "settings.json").write_text(text)
    entries = scan(_settings(tmp_path), tmp_path)
    assert entries["bad"].error is not None and error in entries["bad"].error
    assert entries["good"].error is None


def test_a_rewritten_version_changes_its_fingerprint(tmp_path: Path) -> None:
    path = _version(tmp_path, "a", 1)
    before = scan(_settings(tmp_path), tmp_path)["a"].versions[1].fingerprint
    os.utime(path, ns=(1, 1))
    assert scan(_settings(tmp_path), tmp_path)["a"].versions[1].fingerprint != before


@pytest.mark.parametrize(("text", "version"), [
    (None, None), ("", None), ("1", 1), ("1000000000", 10**9)])
def test_versions_parse_alike_everywhere(text: str | None, version: int | None) -> None:
    assert parse_version(text) == version


@pytest.mark.parametrize("text", ["0", "-1", "1.0", "abc", "1000000001", "١", "9" * 40])
def test_a_version_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="version"):
        parse_version(text)


@pytest.mark.parametrize(("text", "size"), [("640", (640, 640)), ("512x320", (512, 320))])
def test_input_sizes_parse(text: str, size: tuple[int, int]) -> None:
    assert parse_input_size(text) == size


@contextlib.asynccontextmanager
async def _registry(root: Path, **overrides: object) -> AsyncIterator[ModelRegistry]:
    """A registry started on ``root``, stopped afterwards."""
    registry = ModelRegistry(_settings(root, **overrides), Metrics())
    await registry.start()
    try:
        yield registry
    finally:
        await registry.stop()


async def test_routing_by_name_version_and_default(tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    _version(tmp_path, "a", 2)
    _version(tmp_path, "b", 4)
    (tmp_path / "a" / "settings.json").write_text('{"version_policy": {"all": {}}}')
    async with _registry(tmp_path) as registry:
        assert registry.ready
        assert (registry.resolve("a").version, registry.resolve("a", 1).version) == (2, 1)
        with pytest.raises(InvalidRequest, match="name a model"):  # two models, no default
            registry.resolve()
        with pytest.raises(NotFound, match="unknown model"):
            registry.resolve("c")
        with pytest.raises(NotFound, match="version 3"):
            registry.resolve("a", 3)
        assert [(s.name, s.version, s.state) for s in registry.index()] == [
            ("a", 1, "READY"), ("a", 2, "READY"), ("b", 4, "READY")]


async def test_a_new_version_replaces_the_old_and_a_broken_one_leaves_it_serving(
        tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    async with _registry(tmp_path) as registry:
        old = registry.resolve("a")
        _version(tmp_path, "a", 2, scores=np.asarray([[0.8, 0.2]], np.float32))
        await registry.load("a")
        assert registry.resolve("a").version == 2 and old not in registry.detectors()
        await asyncio.gather(*registry._retiring)
        assert [(s.version, s.state, s.reason) for s in registry.index()] == [
            (1, "UNAVAILABLE", "superseded"), (2, "READY", "")]

        (tmp_path / "a" / "3").mkdir()
        (tmp_path / "a" / "3" / "model.onnx").write_bytes(b"\x08\x07 not a model")
        with pytest.raises(LoadFailed, match="version 3"):
            await registry.load("a")
        assert registry.resolve("a").version == 2 and registry.ready
        failed = {s.version: s for s in registry.index()}[3]
        assert failed.state == "UNAVAILABLE" and "not a valid ONNX model" in failed.reason

        # Loads, but answers NaN scores: checked before it serves, and kept out.
        (tmp_path / "a" / "3" / "model.onnx").unlink()
        _version(tmp_path, "a", 3, scores=np.asarray([[np.nan, 0.2]], np.float32))
        with pytest.raises(LoadFailed, match="not finite"):
            await registry.load("a")
        assert registry.resolve("a").version == 2
        events = registry.metrics.exposition().decode()
        assert 'dfine_model_events_total{event="load_failed",model="a",version="3"} 2.0' \
            in events or 'model="a",version="3",event="load_failed"} 2.0' in events


async def test_max_loaded_models_refuses_a_load_past_it_but_not_a_swap(tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    _version(tmp_path, "b", 1)
    async with _registry(tmp_path, max_loaded_models=2) as registry:
        _version(tmp_path, "c", 1)
        with pytest.raises(Conflict, match="MAX_LOADED_MODELS=2"):
            await registry.load("c")
        with pytest.raises(NotFound):
            registry.resolve("c")
        _version(tmp_path, "a", 2)  # replaces a's version 1: counts once
        await registry.load("a")
        assert registry.resolve("a").version == 2
        await registry.unload("b")
        with pytest.raises(NotFound, match="no version loaded"):
            registry.resolve("b")
        await registry.load("c")
        assert registry.resolve("c").version == 1


async def test_load_and_unload_need_explicit_control(tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    async with _registry(tmp_path, model_control="none") as registry:
        with pytest.raises(Conflict, match="MODEL_CONTROL=none"):
            await registry.load("a")
        with pytest.raises(Conflict):
            await registry.unload("a")
        assert registry.resolve().version == 1  # the only model is the default


async def test_a_rewritten_version_is_rolled_in_and_a_broken_rewrite_leaves_the_old_file(
        tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    image = np.zeros((1, 3, onnx_models.INPUT, onnx_models.INPUT), np.float32)
    sizes = np.asarray([[64, 64]], np.int64)
    async with _registry(tmp_path) as registry:
        first = registry.resolve("a")
        fresh = onnx_models.official(tmp_path / "fresh.onnx",
                                     scores=np.asarray([[0.8, 0.2]], np.float32))
        os.replace(fresh, tmp_path / "a" / "1" / "model.onnx")
        await registry.load("a")
        second = registry.resolve("a")
        assert second is not first and second.version == 1
        assert second.engine.run(image, sizes).scores[0, 0] == pytest.approx(0.8)

        (tmp_path / "broken.onnx").write_bytes(b"not a model")
        os.replace(tmp_path / "broken.onnx", tmp_path / "a" / "1" / "model.onnx")
        with pytest.raises(LoadFailed):
            await registry.load("a")
        assert registry.resolve("a") is second
        (status,) = registry.index()
        assert status.state == "READY" and "rewritten file failed to load" in status.reason
        # The failed copy's metrics go; those of the copy serving under the same labels stay.
        assert 'dfine_queue_depth{model="a",version="1"}' in \
            registry.metrics.exposition().decode()


# --- names that leave the repository (issue 25, item 4) -----------------------------------

@pytest.mark.parametrize("name", ["a", "A-1.b_c", "a..b", "7", "a" * 128])
def test_model_names_follow_the_repositorys_rule(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize("name", [
    "", ".", "..", ".hidden", "/etc", "/tmp/x/shapes", "a/b", "a\\b", "../a", "a" * 129,
    "a" * 300, "shapes\n", "shapes\x00", "a b", "café", "-a", "_a"])
def test_a_name_that_could_be_a_path_or_too_long_is_not_a_model_name(name: str) -> None:
    with pytest.raises(ValueError, match="is not a model name"):
        check_name(name)


def test_a_scan_skips_a_name_with_a_trailing_newline(tmp_path: Path) -> None:
    _version(tmp_path, "a", 1)
    _version(tmp_path, "a\n", 1)  # "^...$" matched it: "$" matches before a final newline
    assert list(scan(_settings(tmp_path), tmp_path)) == ["a"]


def test_a_model_directory_must_resolve_inside_the_repository(tmp_path: Path) -> None:
    """A link to a directory outside makes the model's error (shown in the index); a link
    inside the repository, and a linked model file, are followed."""
    root, outside = tmp_path / "repository", tmp_path / "outside"
    _version(root, "a", 1)
    _version(outside, "b", 1)
    (root / "out").symlink_to(outside / "b", target_is_directory=True)
    (root / "alias").symlink_to(root / "a", target_is_directory=True)
    (root / "file" / "1").mkdir(parents=True)
    (root / "file" / "1" / "model.onnx").symlink_to(outside / "b" / "1" / "model.onnx")
    entries = scan(_settings(root), root)
    out = entries["out"]
    assert out.error is not None and "link to outside the model repository" in out.error
    assert not out.versions
    for name in ("a", "alias", "file"):
        assert entries[name].error is None and entries[name].wanted == (1,), name


async def test_names_outside_the_rule_load_nothing_and_leave_readiness(tmp_path: Path
                                                                       ) -> None:
    root, outside = tmp_path / "repository", tmp_path / "outside"
    _version(root, "a", 1)
    _version(outside, "a", 1, scores=np.asarray([[0.8, 0.2]], np.float32))
    _version(root, ".hidden", 1)
    async with _registry(root) as registry:
        served, index = registry.resolve("a"), registry.index()
        for name in ("..", ".", str(outside / "a"), "/etc", "a" * 300, ".hidden", "a\n",
                     "a/../a"):
            with pytest.raises(InvalidRequest, match="is not a model name"):
                await registry.load(name)
            with pytest.raises(InvalidRequest, match="is not a model name"):
                await registry.unload(name)
            with pytest.raises(InvalidRequest, match="is not a model name"):
                registry.resolve(name)
            assert registry.find(name, None) is None
        with pytest.raises(NotFound, match="no model 'ghost'"):
            await registry.load("ghost")
        with pytest.raises(NotFound, match="unknown model 'ghost'"):
            registry.resolve("ghost")
        assert registry.ready and registry.resolve("a") is served
        assert registry.index() == index


async def test_a_load_that_would_serve_nothing_fails_and_leaves_readiness(tmp_path: Path
                                                                           ) -> None:
    root, outside = tmp_path / "repository", tmp_path / "outside"
    _version(root, "a", 1)
    _version(outside, "b", 1)
    async with _registry(root) as registry:
        (root / "empty").mkdir()  # lost+found on a mounted volume: a plain name
        with pytest.raises(LoadFailed, match="no version to serve"):
            await registry.load("empty")
        assert registry.ready
        (root / "out").symlink_to(outside / "b", target_is_directory=True)
        with pytest.raises(LoadFailed, match="link to outside"):
            await registry.load("out")
        assert registry.ready
        (status,) = [s for s in registry.index() if s.name == "out"]
        assert status.state == "UNAVAILABLE" and "link to outside" in status.reason
        with pytest.raises(NotFound):
            registry.resolve("out")


async def test_a_model_path_whose_stem_breaks_the_rule_is_still_served_by_it(
        tmp_path: Path) -> None:
    """MODEL_PATH names its model by the file's stem, which the rule does not bind: a known
    name is served, loaded and unloaded as before."""
    path = onnx_models.official(tmp_path / "my shapes.onnx")
    settings = Settings(model_path=path, providers="cpu", model_control="explicit")
    registry = ModelRegistry(settings, Metrics())
    await registry.start()
    try:
        assert registry.resolve("my shapes").name == "my shapes"
        await registry.unload("my shapes")
        await registry.load("my shapes")
        assert registry.resolve("my shapes").version == 1 and registry.ready
        with pytest.raises(InvalidRequest):
            await registry.load("../my shapes")
    finally:
        await registry.stop()


# --- the control calls' key ----------------------------------------------------------------

@pytest.mark.parametrize(("api_key", "control_key", "given", "outcome"), [
    (None, None, "", None),  # no key at all: open, as before
    ("k", None, "", Unauthorized),
    ("k", None, "k", Forbidden),  # the inference key never swaps models
    ("k", "c", "c", None),
    ("k", "c", "k", Forbidden),
    ("k", "c", "wrong", Unauthorized),
    ("k", "c", "", Unauthorized),
    (None, "c", "", Unauthorized),  # inference open, control not
    (None, "c", "c", None),
])
def test_control_calls_take_the_control_key_alone(
        api_key: str | None, control_key: str | None, given: str,
        outcome: type[Exception] | None) -> None:
    settings = Settings(api_key=api_key, control_api_key=control_key)
    for headers in ({"x-api-key": given}, {"authorization": f"Bearer {given}"}):
        if outcome is None:
            authorize_control(settings, headers)
        else:
            with pytest.raises(outcome):
                authorize_control(settings, headers)


@pytest.mark.parametrize(("given", "opens"), [("k", True), ("c", False), ("", False)])
def test_the_control_key_does_not_open_inference(given: str, opens: bool) -> None:
    settings = Settings(api_key="k", control_api_key="c")
    if opens:
        authorize(settings, {"x-api-key": given})
    else:
        with pytest.raises(Unauthorized):
            authorize(settings, {"x-api-key": given})
