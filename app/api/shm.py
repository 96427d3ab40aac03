"""System shared memory, the Open Inference Protocol's extension as Triton serves it: a
same-host client registers a region of a POSIX shared-memory segment (``/dev/shm/<key>``),
writes a tensor into it, and names the region in an inference request instead of sending the
tensor; an output may be written into a region too.

Segments are read and written with ``pread``/``pwrite`` on a descriptor opened at
registration, never mapped: a segment its owner truncates afterwards gives a short read (a
4xx), not the SIGBUS a mapping would, and no offset needs aligning. A read copies the bytes out
once, into the request's own buffer, which then takes the same path as a body's tensor. The
open descriptor keeps the segment alive while registered, even if its owner unlinks it (as
Triton's mapping does): what the registered segments hold is bounded (MAX_SHM_REGIONS,
MAX_SHM_BYTES) and counted in the service's memory bound.

Keys are limited to SHM_KEY_PREFIXES (empty: the extension is off, 501): one name directly
under /dev/shm, opened without following links, a regular file.

With several front ends (FRONTENDS > 1, each a process), the registrations are the service's,
not a process's: they live in a file of the runtime directory (``shm-regions.json``, written
under an exclusive ``flock``), whose first line is a generation number that each front end
reads (one ``pread``) before it uses a region, reloading the file when it changed. A front end
opens a segment the first time it uses a region registered elsewhere, and checks it is the
very segment registered (device and inode); one unlinked or replaced since then is refused
there (4xx): keep a segment until its region is unregistered.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from app.config import Settings
from app.errors import Conflict, InvalidRequest, NotFound, Unsupported

log = logging.getLogger("dfine.shm")
SHM_DIR = Path("/dev/shm")
STORE_NAME = "shm-regions.json"  # in DFINE_RUNTIME_DIR, with several front ends
RUNTIME_DIR_ENV = "DFINE_RUNTIME_DIR"
MAX_NAME_CHARS = 128  # a region's name: the client's label
MAX_KEY_BYTES = 255  # NAME_MAX
# A read or write is one pread/pwrite unless the kernel returns less (a signal): bounded.
MAX_IO_CALLS = 64




class AlreadyExists(Conflict):
    """A region name registered already (Triton's ALREADY_EXISTS)."""

    code, message = "already_exists", "already registered"


OFF = ("system shared memory is off on this server: SHM_KEY_PREFIXES names the keys it "
       "may open")
CUDA_UNSUPPORTED = "CUDA shared memory is not supported by this server"


@dataclass(frozen=True)
class Registration:
    """A registered region: ``byte_size`` bytes from ``offset`` in the segment ``key``, which
    was the file (``device``, ``inode``) of ``segment_bytes`` bytes when registered."""

    name: str
    key: str
    offset: int
    byte_size: int
    device: int
    inode: int
    segment_bytes: int

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset,
                "byte_size": self.byte_size}


class Segment:
    """An open segment, shared by the requests reading it: closed once the last is done, so
    that an unregister never closes a descriptor a thread is reading (its number could be
    reused by another file meanwhile)."""

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd, self.writable = fd, writable
        self._users = 0
        self._closing = False
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self) -> Iterator[int]:
        with self._lock:
            if self._closing:
                raise NotFound("the shared memory region was unregistered meanwhile")
            self._users += 1
        try:
            yield self.fd
        finally:
            with self._lock:
                self._users -= 1
                last = self._closing and self._users == 0
            if last:
                os.close(self.fd)

    def size(self) -> int | None:
        """The segment's size now (None once closed): its owner may have grown it since."""
        try:
            with self.use() as fd:
                return os.fstat(fd).st_size
        except (NotFound, OSError):
            return None

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            idle = self._users == 0
        if idle:
            os.close(self.fd)


@dataclass
class Region:
    registration: Registration
    segment: Segment | None = None  # opened on first use where registered elsewhere
    problem: str | None = None  # why this process cannot use it


def allowed_prefixes(text: str) -> list[str]:
    """SHM_KEY_PREFIXES as the names under /dev/shm they allow (leading slashes dropped; "/"
    alone allows every key)."""
    return [p.strip().lstrip("/") for p in text.split(",") if p.strip()]


def segment_path(key: str, prefixes: list[str]) -> Path:
    """The file a key names (POSIX shm_open's: /dev/shm/<key without leading slashes>), if the
    key is one name and SHM_KEY_PREFIXES allows it."""
    bare = key.lstrip("/")
    if (not bare or "/" in bare or "\0" in bare or bare in (".", "..")
            or len(bare.encode(errors="replace")) > MAX_KEY_BYTES):
        raise InvalidRequest(f"shared memory key {key[:300]!r} is not a segment name (one "
                             f"name of 1 to {MAX_KEY_BYTES} bytes, after leading slashes)")
    if not any(bare.startswith(p) for p in prefixes):
        raise InvalidRequest(f"shared memory key {key[:300]!r} is not allowed: SHM_KEY_PREFIXES "
                             f"allows {', '.join('/' + p for p in prefixes)}")
    return SHM_DIR / bare


def open_segment(path: Path, key: str) -> tuple[Segment, os.stat_result]:
    """The segment, read-write where its mode lets us (outputs), else read-only."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        try:
            fd = os.open(path, os.O_RDWR | flags)
            writable = True
        except PermissionError:
            fd = os.open(path, os.O_RDONLY | flags)
            writable = False
    except OSError as exc:
        raise InvalidRequest(f"unable to open shared memory segment {key[:300]!r}: "
                             f"{exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InvalidRequest(f"shared memory key {key[:300]!r} is not a shared memory segment")
    return Segment(fd, writable), info


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise InvalidRequest(f"{what} must be a number of bytes (an unsigned integer)")
    return value


def check_name(name: Any) -> str:
    if (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS
            or not name.isprintable()):
        raise InvalidRequest(f"a shared memory region's name must be 1 to {MAX_NAME_CHARS} "
                             f"printable characters")
    return name


class _Store:
    """The registrations of every front end: a file, the generation on its first line."""

    HEADER = 21  # 20 digits and a newline

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def generation(self) -> bytes:
        return os.pread(self.fd, self.HEADER, 0)

    @contextlib.contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def load(self) -> tuple[bytes, list[Registration]]:
        """Under the lock: the generation and the registrations."""
        size = os.fstat(self.fd).st_size
        text = os.pread(self.fd, size, 0)
        if not text:
            return b"", []
        header, _, body = text.partition(b"\n")
        try:
            return header + b"\n", [Registration(**r) for r in orjson.loads(body)]
        except (ValueError, TypeError):
            # A front end killed between its write and its truncate: start over, empty,
            # rather than fail every shared-memory call until the service restarts.
            log.error("the shared memory registrations' file was damaged: every region is "
                      "unregistered; clients must register theirs again")
            return b"", []

    def save(self, generation: bytes, registrations: list[Registration]) -> bytes:
        """Under the exclusive lock: the next generation's content; its header."""
        number = int(generation) + 1 if generation.strip() else 1
        header = b"%020d\n" % number
        text = header + orjson.dumps([asdict(r) for r in registrations])
        os.pwrite(self.fd, text, 0)
        os.ftruncate(self.fd, len(text))
        return header

    def close(self) -> None:
        os.close(self.fd)


class Regions:
    """The registered regions of the service, and reading and writing tensors in them. Its
    calls block (a descriptor to open, a file lock to take): run them off the event loop,
    except the small output writes."""

    def __init__(self, settings: Settings, store: Path | None = None) -> None:
        self.prefixes = allowed_prefixes(settings.shm_key_prefixes)
        self.max_regions = settings.max_shm_regions
        self.max_bytes = settings.max_shm_bytes
        self._lock = threading.Lock()  # the table; flock does not exclude this process's threads
        self._regions: dict[str, Region] = {}
        self._store = _Store(store) if store is not None and self.enabled else None
        self._seen = b""  # the store's generation the table holds

    @classmethod
    def for_service(cls, settings: Settings) -> Regions:
        """Shared by the front ends through the runtime directory when there are several."""
        runtime = os.environ.get(RUNTIME_DIR_ENV)
        return cls(settings, Path(runtime) / STORE_NAME if runtime else None)

    @property
    def enabled(self) -> bool:
        return bool(self.prefixes)

    # --- the extension's calls ----------------------------------------------------------

    def register(self, name: Any, key: Any, offset: Any, byte_size: Any) -> None:
        if not self.enabled:
            raise Unsupported(OFF)
        name = check_name(name)
        if not isinstance(key, str):
            raise InvalidRequest("the register call needs a 'key' string")
        offset, byte_size = _count(offset, "offset"), _count(byte_size, "byte_size")
        if byte_size == 0:
            raise InvalidRequest("byte_size must be at least 1")
        segment, info = open_segment(segment_path(key, self.prefixes), key)
        try:
            if offset + byte_size > info.st_size:
                raise InvalidRequest(
                    f"failed to register shared memory region {name!r}: offset {offset} + "
                    f"byte_size {byte_size} runs past the segment's {info.st_size} bytes")
            registration = Registration(name, key, offset, byte_size, info.st_dev,
                                        info.st_ino, info.st_size)
            with self._lock, self._changing() as table:
                if name in table:
                    raise AlreadyExists(f"shared memory region {name!r} already in manager")
                self._drop_grown(table)
                self._check_bounds([*(r.registration for r in table.values()), registration])
                table[name] = Region(registration, segment)
        except BaseException:
            segment.close()
            raise

    def unregister(self, name: str) -> None:
        """One region (an unknown name is no error, as Triton's), or all of them ('')."""
        if not self.enabled:
            return
        with self._lock, self._changing() as table:
            for gone in [n for n in table if n == name or not name]:
                region = table.pop(gone)
                if region.segment is not None:
                    region.segment.close()

    def status(self, name: str) -> list[Registration]:
        """Every region, or the one named (404 if none)."""
        with self._lock:
            self._refresh()
            if name:
                return [self._find(name).registration]
            return [r.registration for r in self._regions.values()]

    # --- tensors in regions -------------------------------------------------------------

    def check(self, name: str, offset: int, byte_size: int) -> None:
        """That a tensor of ``byte_size`` bytes at ``offset`` lies within region ``name``
        (Triton's checks and messages)."""
        with self._lock:
            self._refresh()
            _within(self._find(name).registration, offset, byte_size)

    def read(self, name: str, offset: int, byte_size: int) -> bytearray:
        """A copy of region ``name``'s bytes [offset, offset + byte_size)."""
        segment, start = self._segment(name, offset, byte_size)
        buffer = bytearray(byte_size)
        view, done = memoryview(buffer), 0
        with segment.use() as fd:
            for _ in range(MAX_IO_CALLS):
                if done == byte_size:
                    break
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    break
                done += got
        if done != byte_size:
            raise InvalidRequest(f"shared memory region {name!r} holds fewer bytes than "
                                 f"registered: its segment was truncated")
        return buffer

    def write(self, name: str, offset: int, data: bytes) -> None:
        """``data`` into region ``name`` at ``offset`` (checked within it already)."""
        segment, start = self._segment(name, offset, len(data))
        if not segment.writable:
            raise InvalidRequest(f"shared memory region {name!r} is read-only to the server")
        view, done = memoryview(data), 0
        with segment.use() as fd:
            # A write past the end would grow a segment its owner truncated: refused.
            if os.fstat(fd).st_size < start + len(data):
                raise InvalidRequest(f"shared memory region {name!r} holds fewer bytes than "
                                     f"registered: its segment was truncated")
            for _ in range(MAX_IO_CALLS):
                if done == len(data):
                    break
                done += os.pwrite(fd, view[done:], start + done)
        if done != len(data):
            raise InvalidRequest(f"could not write shared memory region {name!r}")

    def close(self) -> None:
        with self._lock:
            for region in self._regions.values():
                if region.segment is not None:
                    region.segment.close()
            self._regions = {}
            if self._store is not None:
                self._store.close()
                self._store = None

    # --- the table ----------------------------------------------------------------------

    def _find(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find shared memory region: {name[:MAX_NAME_CHARS]!r}")
        return region

    def _segment(self, name: str, offset: int, byte_size: int) -> tuple[Segment, int]:
        """Region ``name``'s open segment (opened here if registered by another front end)
        and where in it the tensor starts, within the region checked again (it may have
        been registered anew since the request was parsed)."""
        with self._lock:
            self._refresh()
            region = self._find(name)
            registration = region.registration
            _within(registration, offset, byte_size)
            if region.segment is None and region.problem is None:
                region.problem = self._adopt(region)
            if region.problem is not None:
                raise InvalidRequest(region.problem)
            assert region.segment is not None
            if _grown(region):
                with self._changing() as table:
                    self._drop_grown(table)
                raise InvalidRequest(GREW.format(name=name))
            return region.segment, registration.offset + offset

    def _adopt(self, region: Region) -> str | None:
        """Open a region registered by another front end: the same segment, or why not."""
        registration = region.registration
        gone = (f"the segment of shared memory region {registration.name!r} was unlinked or "
                f"replaced after it was registered: register it again")
        try:
            segment, info = open_segment(segment_path(registration.key, self.prefixes),
                                         registration.key)
        except InvalidRequest:
            return gone
        if (info.st_dev, info.st_ino) != (registration.device, registration.inode):
            segment.close()
            return gone
        region.segment = segment
        return None

    def _refresh(self) -> None:
        """Under ``_lock``: the table as the store has it, if another front end changed it."""
        if self._store is None or self._store.generation() == self._seen:
            return
        with self._store.locked(exclusive=False):
            self._seen, registrations = self._store.load()
        self._replace(registrations)

    def _replace(self, registrations: list[Registration]) -> None:
        table = {}
        for registration in registrations:
            kept = self._regions.get(registration.name)
            table[registration.name] = (kept if kept is not None
                                        and kept.registration == registration
                                        else Region(registration))
        for name, region in self._regions.items():
            if table.get(name) is not region and region.segment is not None:
                region.segment.close()
        self._regions = table

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, Region]]:
        """Under ``_lock``: the table to change, as the store has it, saved after."""
        if self._store is None:
            yield self._regions
            return
        with self._store.locked(exclusive=True):
            self._seen, registrations = self._store.load()
            self._replace(registrations)
            yield self._regions
            self._seen = self._store.save(self._seen, [r.registration
                                                       for r in self._regions.values()])

    def _drop_grown(self, table: dict[str, Region]) -> None:
        """Under ``_lock``, in ``_changing``: unregister the regions whose segment grew past
        its registered size. Its open descriptor would keep all of it alive (even unlinked),
        beyond what MAX_SHM_BYTES counted."""
        for name in [n for n, region in table.items() if _grown(region)]:
            region = table.pop(name)
            if region.segment is not None:
                region.segment.close()

    def _check_bounds(self, registrations: list[Registration]) -> None:
        if len(registrations) > self.max_regions:
            raise Conflict(f"{self.max_regions} shared memory regions are registered, "
                           f"MAX_SHM_REGIONS: unregister one first")
        held = _segments_bytes(registrations)
        if held > self.max_bytes:
            raise Conflict(f"the registered segments would hold {held} bytes, over "
                           f"MAX_SHM_BYTES ({self.max_bytes}): unregister some first")


GREW = ("the segment of shared memory region {name!r} grew after it was registered: it is "
        "unregistered (its memory was counted at its registered size); register it again")


def _grown(region: Region) -> bool:
    size = region.segment.size() if region.segment is not None else None
    return size is not None and size > region.registration.segment_bytes


def _segments_bytes(registrations: list[Registration]) -> int:
    """What the registered segments hold: each segment's size once, however many regions
    lie in it (its descriptor keeps all of it alive)."""
    sizes = {(r.device, r.inode): r.segment_bytes for r in registrations}
    return sum(sizes.values())


def _within(registration: Registration, offset: int, byte_size: int) -> None:
    if offset >= registration.byte_size and byte_size:
        raise InvalidRequest(f"Invalid offset for shared memory region: "
                             f"{registration.name!r}: offset {offset} is past its "
                             f"{registration.byte_size} bytes")
    if offset + byte_size > registration.byte_size:
        raise InvalidRequest(f"Invalid offset + byte size for shared memory region: "
                             f"{registration.name!r}: {offset} + {byte_size} is past its "
                             f"{registration.byte_size} bytes")


def memory_bound_bytes(settings: Settings) -> int:
    """What registered regions keep alive: their segments, each once and whole, at most
    MAX_SHM_BYTES (0 while SHM_KEY_PREFIXES is empty: nothing can be registered)."""
    return settings.max_shm_bytes if settings.shm_key_prefixes.strip() else 0
