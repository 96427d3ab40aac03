"""Triton's log settings (the extension ``logging``): the log level, changed while the
service runs. Triton's flags map onto the root logger's level: ``log_verbose_level`` >= 1 is
DEBUG; else INFO with ``log_info``, WARNING with ``log_warning``, ERROR with ``log_error``,
nothing at all with none of them. The destination (stderr) and the format (LOG_FORMAT) are set
at start: a request may only give their current values.

With FRONTENDS > 1 the settings are the service's: the engine process keeps them, and
applies them, and every front end follows them (``LogControl.share``, ``follow``); the
supervisor keeps LOG_LEVEL.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from app.errors import InvalidRequest

FLAGS = ("log_info", "log_warning", "log_error")
KEYS = ("log_file", "log_info", "log_warning", "log_error", "log_verbose_level", "log_format")
MAX_VERBOSE = 2**32 - 1  # Triton's uint32
FORMAT_NAMES = {"text": "default", "json": "json"}  # LOG_FORMAT, as this extension names it


@dataclass(frozen=True)
class LogSettings:
    log_file: str
    log_info: bool
    log_warning: bool
    log_error: bool
    log_verbose_level: int
    log_format: str

    @property
    def level(self) -> int:
        if self.log_verbose_level >= 1:
            return logging.DEBUG
        for flag, level in zip(FLAGS, (logging.INFO, logging.WARNING, logging.ERROR)):
            if getattr(self, flag):
                return level
        return logging.CRITICAL + 1

    def json(self) -> dict[str, Any]:
        return asdict(self)


def _from_level(level: int, log_format: str) -> LogSettings:
    return LogSettings("", level <= logging.INFO, level <= logging.WARNING,
                       level <= logging.ERROR, 1 if level <= logging.DEBUG else 0,
                       FORMAT_NAMES.get(log_format, log_format))


class LogShare(Protocol):
    """Where a front end's changes go with FRONTENDS > 1 (app.frontend.RemoteRegistry): to
    the engine process, which keeps the service's settings; each front end, this one
    included, then follows them (``LogControl.follow``) before the change is answered."""

    async def change_log(self, changes: dict[str, Any]) -> None: ...


class LogControl:
    """This process's log settings: read from the root logger at start, changed by
    ``update`` (this process's) or ``change`` (the service's)."""

    share: LogShare | None = None  # set in a front end of FRONTENDS > 1

    def __init__(self, log_format: str) -> None:
        self.current = _from_level(logging.getLogger().getEffectiveLevel(), log_format)

    def update(self, changes: dict[str, Any]) -> LogSettings:
        """Apply ``changes`` (Triton's keys; a None value is no change) all or none; raise
        InvalidRequest, changing nothing, for an unknown key or a value of the wrong type."""
        self._set(replace(self.current, **self.check(changes)))
        return self.current

    async def change(self, changes: dict[str, Any]) -> LogSettings:
        """``update`` for the service: in a front end, checked here, then applied by the
        engine process and followed by every front end before this returns."""
        if self.share is None:
            return self.update(changes)
        await self.share.change_log(self.check(changes))
        return self.current

    def follow(self, settings: LogSettings) -> None:
        """Take the service's level (a front end, from the engine process); the destination
        and format stay this process's (the same: set at start)."""
        settings = replace(settings, log_file=self.current.log_file,
                           log_format=self.current.log_format)
        if settings != self.current:
            self._set(settings)

    def _set(self, settings: LogSettings) -> None:
        self.current = settings
        logging.getLogger().setLevel(settings.level)

    def check(self, changes: dict[str, Any]) -> dict[str, Any]:
        """The values ``changes`` gives (None: no change), once each is known valid."""
        unknown = sorted(set(changes) - set(KEYS))
        if unknown:
            raise InvalidRequest(f"unknown log setting(s) {unknown[:8]}; known: {list(KEYS)}")
        given = {k: v for k, v in changes.items() if v is not None}
        for flag in FLAGS:
            if flag in given and not isinstance(given[flag], bool):
                raise InvalidRequest(f"{flag} must be true or false")
        verbose = given.get("log_verbose_level")
        if verbose is not None and (isinstance(verbose, bool) or not isinstance(verbose, int)
                                    or not 0 <= verbose <= MAX_VERBOSE):
            raise InvalidRequest(f"log_verbose_level must be an integer from 0 to {MAX_VERBOSE}")
        for key in ("log_file", "log_format"):
            if key in given and given[key] != getattr(self.current, key):
                raise InvalidRequest(
                    f"{key} cannot be changed while the service runs: it is "
                    f"{getattr(self.current, key)!r} (" + (
                        "the service logs to stderr)" if key == "log_file"
                        else "LOG_FORMAT, set at start)"))
        return given


_control: LogControl | None = None


def log_control(log_format: str) -> LogControl:
    """The process's one LogControl (the root logger is the process's)."""
    global _control
    if _control is None:
        _control = LogControl(log_format)
    return _control


# gRPC's SettingValue: which member of its oneof each key takes (tritonclient's choice).
_GRPC_MEMBER = {"log_file": "string_param", "log_format": "string_param",
                "log_verbose_level": "uint32_param"}
_GRPC_KINDS = {"string_param": "a string", "uint32_param": "an unsigned integer",
               "bool_param": "a boolean"}


def grpc_member(key: str) -> str:
    return _GRPC_MEMBER.get(key, "bool_param")


def from_grpc(settings: Any) -> dict[str, Any]:
    """A LogSettingsRequest's ``settings`` map as ``update`` takes it: a value with no member
    set is no change; a member of the wrong kind is refused."""
    changes: dict[str, Any] = {}
    for key, value in settings.items():
        member = value.WhichOneof("parameter_choice")
        if member is None:
            changes[key] = None
            continue
        wanted = grpc_member(key)
        if key in KEYS and member != wanted:
            raise InvalidRequest(f"expect {_GRPC_KINDS[wanted]} for {key!r}")
        changes[key] = getattr(value, member)
    return changes
