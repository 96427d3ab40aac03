"""Logging setup: plain text, or one JSON object a line (for log pipelines)."""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import threading
import time
from typing import Any, cast

import orjson

from app.threads import name_os_thread

# Attributes every LogRecord has; anything else came in through ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str, fmt: str, writer_thread: bool = True) -> None:
    """Logging for the whole process. ``writer_thread``: records are formatted and written by
    a thread of their own (not in a process that forks children: the supervisor)."""
    # Neither format shows the caller, thread or process: skip computing them for every record
    # (the logging HOWTO's "Optimization"; the access log writes one record per request).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    global _handoff
    _handoff = _written_in_a_thread(handler) if writer_thread else None
    root.handlers[:] = [_handoff or handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # one format for everything
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


MAX_WAITING_RECORDS = 10_000

# A record still to be made by the writer: (logger, level, message, args, extra, time.time()).
Deferred = tuple[logging.Logger, int, str, tuple[Any, ...], dict[str, Any], float]
_handoff: _Handoff | None = None  # the process's, once configure() starts a writer


def log_later(logger: logging.Logger, level: int, message: str, args: tuple[Any, ...],
              extra: dict[str, Any]) -> None:
    """``logger.log(level, message, *args, extra=extra)`` with the record made by the log's
    writer thread: the access log's line per request cost the event loop more in making its
    record (and in logging's locks and queue's condition) than in anything else it did. Its
    time is taken now. Without a writer thread (the supervisor), a plain ``logger.log``."""
    if _handoff is None:
        logger.log(level, message, *args, extra=extra)
    elif logger.isEnabledFor(level):
        _handoff.put((logger, level, message, args, extra, time.time()))


class _Handoff(logging.handlers.QueueHandler):
    """Records to a bounded queue, formatted and written by a thread of their own: the
    event loop's per-request work does not include formatting and the write. When the writer
    falls behind (a blocked stderr), records are dropped and counted, never buffered without
    bound. (A SimpleQueue, bounded by its size: queue.Queue's condition variables cost a
    put more than the rest of it.)"""

    dropped = 0

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord | Deferred]) -> None:
        super().__init__(records)
        self.records = records

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted by the writer (the same process: nothing to pickle)

    def enqueue(self, record: logging.LogRecord) -> None:
        self.put(record)

    def put(self, item: logging.LogRecord | Deferred) -> None:
        if self.records.qsize() >= MAX_WAITING_RECORDS:
            _Handoff.dropped += 1
        else:
            self.records.put_nowait(item)


class _SaysWhatWasDropped(logging.Handler):
    """The writer's handler: before the next record, a line saying how many were dropped."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler, self.reported = handler, 0

    def handle(self, record: logging.LogRecord) -> bool:
        dropped = _Handoff.dropped
        if dropped > self.reported:
            self.handler.handle(logging.makeLogRecord({
                "name": "dfine.logs", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "%d log records dropped: the log's writer fell behind",
                "args": (dropped - self.reported,)}))
            self.reported = dropped
        return self.handler.handle(record)


class _Writer(logging.handlers.QueueListener):
    def _monitor(self) -> None:
        threading.current_thread().name = "log-writer"
        name_os_thread()  # told apart from the others in /proc and the bench
        super()._monitor()  # type: ignore[misc]

    def prepare(self, record: Any) -> logging.LogRecord:
        if isinstance(record, logging.LogRecord):
            return record
        logger, level, message, args, extra, created = cast(Deferred, record)
        try:
            made = logger.makeRecord(logger.name, level, "(unknown file)", 0, message, args,
                                     None, extra=extra)
        except Exception as exc:  # (a reserved name in extra): said, and the writer goes on
            made = logging.makeLogRecord({
                "name": "dfine.logs", "levelno": logging.ERROR, "levelname": "ERROR",
                "msg": "a record of %s could not be made: %r", "args": (logger.name, exc)})
        made.created, made.msecs = created, int((created - int(created)) * 1000) + 0.0
        made.relativeCreated = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
        return made


def _written_in_a_thread(handler: logging.Handler) -> _Handoff:
    records: queue.SimpleQueue[logging.LogRecord | Deferred] = queue.SimpleQueue()
    listener = _Writer(records, _SaysWhatWasDropped(handler))
    listener.start()
    atexit.register(listener.stop)  # what is queued is written before the process ends
    return _Handoff(records)
