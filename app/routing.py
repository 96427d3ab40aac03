"""Which loaded model version a request goes to, and the answers when none can take it.

Shared by the registry that loads the models (app.registry: one process, or the engine
process) and by a front end's mirror of the engine's models (app.frontend): both answer
``resolve`` alike, with the same errors.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from app.config import Settings
from app.engine.engine import OnnxEngine
from app.errors import InvalidRequest, NotFound, NotReady
from app.model_repository import check_name
from app.service import Detector

State = Literal["LOADING", "READY", "UNLOADING", "UNAVAILABLE"]


@dataclass(frozen=True)
class VersionStatus:
    """A line of the repository index (Triton's states)."""

    name: str
    version: int | None  # None: the model as a whole (e.g. its settings.json is wrong)
    state: State
    reason: str = ""


class Routing:
    """The models a service serves, as its routes see them: lookups over a table of served
    versions (``_table``), the names a repository holds (``_repository_names``) and those
    loading (``_is_loading``); and what each kind of registry provides (the rest)."""

    settings: Settings
    started: bool
    accepting: bool
    failure: str | None

    def index(self, ready_only: bool = False) -> list[VersionStatus]:
        raise NotImplementedError

    @property
    def hung(self) -> bool:
        raise NotImplementedError

    @property
    def ready(self) -> bool:
        raise NotImplementedError

    @property
    def memory_bound_bytes(self) -> int:
        raise NotImplementedError

    async def start(self, engine: OnnxEngine | None = None) -> None:
        raise NotImplementedError

    async def poll_forever(self) -> None:
        raise NotImplementedError

    async def load(self, name: str) -> None:
        raise NotImplementedError

    async def unload(self, name: str) -> None:
        raise NotImplementedError

    async def drain(self, timeout_s: float) -> bool:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _table(self) -> dict[str, dict[int, Detector]]:
        raise NotImplementedError

    def _is_loading(self, name: str) -> bool:
        raise NotImplementedError

    def _repository_names(self) -> Collection[str]:
        raise NotImplementedError

    def default_name(self) -> str:
        if self.settings.default_model:
            return self.settings.default_model
        names = sorted(set(self._table()) | set(self._repository_names()))
        if len(names) == 1:
            return names[0]
        raise InvalidRequest(f"name a model (query model=...): this service serves "
                             f"{', '.join(names[:20]) or 'none yet'}")

    def default_or_none(self) -> str | None:
        try:
            return self.default_name()
        except InvalidRequest:
            return None

    def resolve(self, name: str | None = None, version: int | None = None) -> Detector:
        """The detector a request for ``name`` (default: the default model) and ``version``
        (default: its newest loaded) goes to; NotFound, or NotReady while it loads."""
        if not self.started or not self.accepting:
            raise NotReady()
        name = name or self.default_name()
        table = self._table()
        versions = table.get(name)
        if not versions:
            self.validate_name(name)
            if self._is_loading(name):
                raise NotReady(f"model {name[:128]!r} is loading")
            if name in self._repository_names():
                raise NotFound(f"model {name!r} has no version loaded")
            raise NotFound(f"unknown model {name[:128]!r}; this service serves "
                           f"{', '.join(sorted(table)[:20]) or 'none'}")
        if version is None:
            return versions[max(versions)]
        detector = versions.get(version)
        if detector is None:
            raise NotFound(f"version {version} of model {name!r} is not loaded (loaded: "
                           f"{', '.join(map(str, sorted(versions)))})")
        return detector

    def find(self, name: str | None, version: int | None) -> Detector | None:
        try:
            return self.resolve(name, version)
        except (NotFound, NotReady, InvalidRequest):
            return None

    def detectors(self) -> list[Detector]:
        """Every loaded version's, by name then version."""
        table = self._table()
        return [table[n][v] for n in sorted(table) for v in sorted(table[n])]

    def versions_of(self, name: str) -> list[int]:
        return sorted(self._table().get(name, {}))

    def model_ready(self, name: str, version: int | None = None) -> bool:
        versions = self._table().get(name, {})
        return self.started and self.accepting and (
            bool(versions) if version is None else version in versions)

    def known(self, name: str) -> bool:
        return name in self._repository_names() or name in self._table()

    def validate_name(self, name: str) -> None:
        """Every name a client gives passes here before anything is looked up or read: one
        the service knows, or one that follows the repository's naming rule; InvalidRequest
        otherwise. (A known name may break the rule: MODEL_PATH's stem names its model.)"""
        if self.known(name):
            return
        try:
            check_name(name)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
