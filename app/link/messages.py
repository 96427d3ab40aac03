"""What crosses between a front end and the engine process: small messages, pickled by
app.link.channel (both ends are this service's own processes, on a socket in a private
directory). Image tensors never travel here: a ``Run`` names the slot that holds one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from app.api.v2_logging import LogSettings
from app.config import Settings
from app.engine.model import ModelInfo
from app.engine.sessions import Parallelism
from app.errors import ServiceError
from app.routing import VersionStatus
from app.tracing import TraceConfig


@dataclass(frozen=True)
class RuntimeSettings:
    """The log and trace settings changed while the service runs: the engine process keeps
    the service's, in each State; ``revision`` counts the changes it took."""

    revision: int
    log: LogSettings
    trace: TraceConfig


# --- front end -> engine ------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    frontend: int  # its index, 0..FRONTENDS-1
    pid: int
    # The settings it follows: an engine process started again takes them over (it has
    # taken no change yet), rather than turning the service back to the start values.
    runtime: RuntimeSettings | None = None


@dataclass(frozen=True)
class Pool:
    """A slot pool for one loaded version (``detector``: its ``VersionView.serial``); its
    memfd rides with this message. The engine runs the pool's images on that version until
    the pool is closed, even once newer ones serve."""

    pool: int
    detector: int
    shape: tuple[int, ...]
    count: int


@dataclass(frozen=True)
class PoolClosed:
    pool: int


@dataclass(frozen=True)
class Run:
    """One image, in slot ``slot`` of pool ``pool``, for version ``version`` of ``name``."""

    id: int
    name: str
    version: int
    pool: int
    slot: int
    width: int
    height: int
    target_size_wh: tuple[int, int]
    timeout_s: float


@dataclass(frozen=True)
class RunMany:
    """Runs queued together, under one lock of the batcher (the tiles of one image): each is
    answered on its own id; a Cancel of any one cancels them all."""

    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Cancel:
    """The client of run ``id`` has gone: drop it if its batch has not started."""

    id: int


@dataclass(frozen=True)
class Control:
    id: int
    action: Literal["load", "unload"]
    name: str


@dataclass(frozen=True)
class ChangeSettings:
    """A log or trace settings change, checked by the front end that took it: ``changes``
    are app.api.v2_logging's (``what`` log) or app.tracing.parse_changes' values (trace, for
    ``model``, or the global settings when None). Answered (Done) once every front end has
    seen the State that carries it, as a Control."""

    id: int
    what: Literal["log", "trace"]
    changes: dict[str, Any]
    model: str | None = None


@dataclass(frozen=True)
class StateSeen:
    seq: int


# --- engine -> front end ------------------------------------------------------------------


@dataclass(frozen=True)
class VersionView:
    """What a front end needs of a loaded version to admit, decode and answer for it."""

    name: str
    version: int
    serial: int  # this loaded copy (a rewritten file is a new one)
    info: ModelInfo
    settings: Settings  # the version's own (its settings.json over the service's)
    parallel: Parallelism
    buckets: tuple[int, ...]
    report: dict[str, Any]
    max_admitted: int  # images each front end may admit for it at once


@dataclass(frozen=True)
class State:
    """The engine's models, sent whenever they change (``seq`` counts the changes)."""

    seq: int
    versions: tuple[VersionView, ...]
    index: tuple[VersionStatus, ...]
    known: frozenset[str]  # names in the repository or loaded
    loading: frozenset[str]  # names with a version loading
    started: bool
    ready: bool
    hung: bool
    failure: str | None
    memory_bound_bytes: int  # the engine process's share
    runtime: RuntimeSettings | None = None  # the service's log and trace settings


@dataclass(frozen=True)
class Result:
    """Run ``id``'s detections in the official layout (k candidates), as raw arrays."""

    id: int
    labels: bytes  # int64 (k,)
    boxes: bytes  # float32 (k, 4)
    scores: bytes  # float32 (k,)
    run_started: float  # time.perf_counter() (CLOCK_MONOTONIC: the same in every process)
    run_finished: float
    batch_size: int


@dataclass(frozen=True)
class Failed:
    """Run or control call ``id`` failed with a service error (its class by name)."""

    id: int
    error: str
    message: str
    retry_after_s: int = 1


@dataclass(frozen=True)
class Done:
    """Control call ``id`` is done, and every front end has seen its change."""

    id: int


def failed(id: int, exc: ServiceError) -> Failed:
    return Failed(id, type(exc).__name__, exc.message, getattr(exc, "retry_after_s", 1))


def error_of(message: Failed) -> ServiceError:
    """The service error a ``Failed`` stands for (an unknown name: an internal error)."""
    import app.errors as errors

    kind = getattr(errors, message.error, None)
    if not (isinstance(kind, type) and issubclass(kind, ServiceError)):
        return errors.EngineFailure(message.message)
    exc = kind(message.message)
    if isinstance(exc, errors.Overloaded):
        exc.retry_after_s = message.retry_after_s
    return exc
