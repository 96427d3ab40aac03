"""A model repository on disk, in Triton's layout, read without loading anything:

    DIR/<name>/<version>/model.onnx      versions are positive integers
    DIR/<name>/labels.txt                optional: class names, one a line
    DIR/<name>/settings.json             optional: what differs for this model (below)

``settings.json`` holds any of PER_MODEL_SETTINGS (the service's own setting names, e.g.
``{"input_size": "512", "max_batch_size": 4, "precision": "fp16"}``) and a version policy in
Triton's form: ``{"version_policy": {"latest": {"num_versions": 2}}}``, ``{"all": {}}`` or
``{"specific": {"versions": [1, 3]}}``; the default is the latest version only.

A scan reports what each model wants served and a fingerprint of each version's files, so
that a poll can tell a new or rewritten version from one it has already tried.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.config import Settings

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
SETTINGS_FILE = "settings.json"
MAX_SETTINGS_BYTES = 64 * 1024
# Names are used in URLs, metric labels, logs and as directory names: keep them plain. A
# plain name is never a path (no separator, not "." or "..", no leading dot) and never too
# long for a file system. \A and \Z, not ^ and $: "$" matches before a trailing newline.
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
MAX_VERSION = 10**9
# What a model may set for itself; the rest (limits, ports, keys) is the service's.
PER_MODEL_SETTINGS = frozenset({
    "input_size", "preprocess", "orientation", "precision", "providers", "trt_fp16",
    "max_batch_size", "batch_buckets", "cuda_graph", "max_delay_ms", "max_queue",
    "instances", "intra_op_threads", "decode_workers", "score_threshold", "max_detections",
    "clip_boxes", "dedupe_iou", "tile", "tile_overlap", "tile_merge", "tile_merge_threshold",
    "tile_merge_metric", "tile_full_image",
})

Fingerprint = tuple[tuple[str, int, int], ...]  # (file, size, mtime_ns) of what a load reads


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: the latest ``latest`` ones, or ``specific`` ones,
    or all (both None)."""

    latest: int | None = 1
    specific: frozenset[int] | None = None

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        if self.latest is not None:
            return ordered[-self.latest:]
        return ordered

    @classmethod
    def parse(cls, value: Any) -> VersionPolicy:
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError("version_policy: one of {\"latest\": {\"num_versions\": N}}, "
                             "{\"all\": {}}, {\"specific\": {\"versions\": [...]}}")
        kind, body = next(iter(value.items()))
        body = body if isinstance(body, dict) else None
        if kind == "all" and body == {}:
            return cls(latest=None)
        if kind == "latest" and body is not None and set(body) <= {"num_versions"}:
            count = body.get("num_versions", 1)
            if isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= 64:
                return cls(latest=count)
            raise ValueError("version_policy latest: num_versions from 1 to 64")
        if kind == "specific" and body is not None and set(body) == {"versions"}:
            versions = body["versions"]
            if (isinstance(versions, list) and versions and len(versions) <= 64
                    and all(_is_version(v) for v in versions)):
                return cls(latest=None, specific=frozenset(versions))
            raise ValueError("version_policy specific: versions, a list of positive integers")
        raise ValueError(f"version_policy: unknown or malformed policy {kind!r}")


def parse_version(text: str | None) -> int | None:
    """A version written as text (a directory's name, a URL's segment, a query, a gRPC
    field): None when absent or empty; ValueError unless a positive integer up to
    MAX_VERSION."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(MAX_VERSION))):
        raise ValueError(f"version {text[:32]!r} is not a positive integer")
    version = int(text)
    if not 0 < version <= MAX_VERSION:
        raise ValueError(f"version {text[:32]!r} is not from 1 to {MAX_VERSION}")
    return version


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_VERSION


@dataclass(frozen=True)
class VersionFiles:
    version: int
    path: Path  # its model.onnx
    fingerprint: Fingerprint


@dataclass(frozen=True)
class ModelEntry:
    """One model directory as found: the versions its policy wants (newest last), each with
    its files, and the settings to load them with; or why it cannot be served."""

    name: str
    versions: dict[int, VersionFiles] = field(default_factory=dict)
    wanted: tuple[int, ...] = ()
    settings: Settings | None = None
    error: str | None = None


def _stat(path: Path) -> tuple[str, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return path.name, info.st_size, info.st_mtime_ns


def per_model_settings(base: Settings, directory: Path) -> tuple[Settings, VersionPolicy]:
    """The service's settings with this model's own (settings.json, labels.txt) over them, and
    its version policy. Raises ValueError saying what is wrong with the file."""
    overrides: dict[str, Any] = {}
    policy = VersionPolicy()
    settings_path = directory / SETTINGS_FILE
    if settings_path.is_file():
        if settings_path.stat().st_size > MAX_SETTINGS_BYTES:
            raise ValueError(f"{SETTINGS_FILE} is over {MAX_SETTINGS_BYTES} bytes")
        try:
            document = json.loads(settings_path.read_bytes())
        except ValueError as exc:
            raise ValueError(f"{SETTINGS_FILE} is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise ValueError(f"{SETTINGS_FILE} must hold a JSON object")
        if "version_policy" in document:
            policy = VersionPolicy.parse(document.pop("version_policy"))
        unknown = sorted(set(document) - PER_MODEL_SETTINGS)
        if unknown:
            raise ValueError(f"{SETTINGS_FILE}: {', '.join(unknown)} cannot be set per model; "
                             f"these can: {', '.join(sorted(PER_MODEL_SETTINGS))}")
        overrides.update(document)
    labels = directory / LABELS_FILE
    overrides["labels_path"] = labels if labels.is_file() else None
    try:
        # Every field given: the environment is not read again.
        settings = Settings(**{**base.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: "
                             f"{str(e['msg']).removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ValueError(f"{SETTINGS_FILE}: {problems}") from None
    return settings, policy


def check_name(name: str) -> None:
    """ValueError unless ``name`` follows the repository's naming rule (NAME_PATTERN): the one
    check of every model name a client gives, on every route and protocol."""
    if not NAME_PATTERN.match(name):
        shown = f"{name[:64]!r}{'...' if len(name) > 64 else ''}"
        raise ValueError(f"{shown} is not a model name: 1 to 128 letters, digits, '_', '.' "
                         f"or '-', starting with a letter or a digit")


def model_directory(root: Path, name: str) -> Path:
    """Where model ``name`` lives in repository ``root``; ValueError for a name that is not a
    model's (so that a name never reaches a path outside ``root``)."""
    check_name(name)
    return root / name


def _outside(root: Path, directory: Path) -> str | None:
    """Why ``directory`` is not the repository's own (a link that leads out of it), or None.
    Only the model's directory is held to this: what it holds (a linked model.onnx) is the
    operator's to arrange."""
    try:
        inside = directory.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
        return "its directory cannot be resolved (a loop of links?)"
    return None if inside else "its directory is a link to outside the model repository"


def scan_model(base: Settings, root: Path, name: str) -> ModelEntry:
    """Model ``name`` of repository ``root`` as found (its directory must exist); ValueError
    for a name that is not a model's."""
    directory = model_directory(root, name)
    outside = _outside(root, directory)
    if outside is not None:
        return ModelEntry(name, error=outside)
    try:
        settings, policy = per_model_settings(base, directory)
    except (OSError, ValueError) as exc:
        return ModelEntry(name, error=str(exc))
    shared = tuple(s for s in (_stat(directory / SETTINGS_FILE), _stat(directory / LABELS_FILE))
                   if s is not None)
    versions = {}
    for child in directory.iterdir():
        # A version directory without its model.onnx yet (being copied in) is not a version.
        try:
            version = parse_version(child.name)
        except ValueError:
            continue
        model = _stat(child / MODEL_FILE)
        if version is not None and child.is_dir() and model is not None:
            versions[version] = VersionFiles(version, child / MODEL_FILE, (model, *shared))
    wanted = tuple(policy.select(list(versions)))
    return ModelEntry(name, versions, wanted, settings.model_copy(), None)


def scan(base: Settings, root: Path) -> dict[str, ModelEntry]:
    """Every model directory under ``root`` (a name that is not plain is skipped)."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    return {child.name: scan_model(base, root, child.name) for child in sorted(root.iterdir())
            if child.is_dir() and NAME_PATTERN.match(child.name)}


def single_model(settings: Settings) -> ModelEntry:
    """MODEL_PATH as a repository of one: the file's stem, version 1."""
    path = settings.model_path
    stat = _stat(path)
    files = VersionFiles(1, path, (stat,) if stat else ())
    return ModelEntry(path.stem, {1: files}, (1,), settings)
