"""Framed messages over a Unix socket, each able to carry file descriptors (SCM_RIGHTS).

asyncio's transports read with ``recv`` and would drop the descriptors, so both ends read and
write the non-blocking socket themselves on the event loop: a frame is a 4-byte big-endian
length, a byte counting its descriptors, and a pickled message. Descriptors ride with a frame's
first bytes, but one read may return the end of an earlier frame with them: they wait in a
queue, and each frame takes as many as its header says.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import pickle
import socket
import struct
from collections import deque
from typing import Any

HEADER = struct.Struct(">IB")  # the message's length, its descriptors
MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_FDS = 16
READ_BYTES = 256 * 1024


class ChannelClosed(ConnectionError):
    """The other end has gone."""


class Channel:
    """One connection: ``send`` queues a message (and descriptors) and returns at once;
    ``receive`` awaits the next message and the descriptors that came with it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[tuple[Any, list[int]] | None] = asyncio.Queue()
        self._buffer = bytearray()
        self._fds: deque[int] = deque()  # received, not yet handed out with their frame
        self._outbox: deque[tuple[memoryview, list[int]]] = deque()
        self._writing = False
        self.closed = False
        self._loop.add_reader(sock.fileno(), self._readable)

    # --- sending --------------------------------------------------------------------------

    def send(self, message: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        if self.closed:
            raise ChannelClosed()
        if len(fds) > MAX_FDS:
            raise ValueError(f"at most {MAX_FDS} descriptors a message")
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._outbox.append((memoryview(HEADER.pack(len(body), len(fds)) + body), list(fds)))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", fds))])
                    self._outbox[0] = (data, [])  # the descriptors went with the first byte
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close()
                return
            if sent == len(data):
                self._outbox.popleft()
            else:
                self._outbox[0] = (data[sent:], [])
        if self._outbox and not self._writing:
            self._writing = True
            self._loop.add_writer(self.sock.fileno(), self._writable)
        elif not self._outbox and self._writing:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())

    def _writable(self) -> None:
        self._flush()

    # --- receiving ------------------------------------------------------------------------

    async def receive(self) -> tuple[Any, list[int]]:
        """The next message and its descriptors (the caller owns and closes them); raises
        ChannelClosed once the other end has gone and every message has been read."""
        item = await self._inbox.get()
        if item is None:
            self._inbox.put_nowait(None)  # every later call says so too
            raise ChannelClosed()
        return item

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(
                READ_BYTES, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            self._close()
            return
        self._buffer += data
        self._frames()

    def _frames(self) -> None:
        """Every complete frame in the buffer, in order; what is read of the next one stays.
        The buffer is cut once, not after each frame (a read holds dozens of results)."""
        start, end = 0, len(self._buffer)
        try:
            while end - start >= HEADER.size:
                size, count = HEADER.unpack_from(self._buffer, start)
                if size > MAX_FRAME_BYTES or count > MAX_FDS:
                    self._close()
                    return
                if end - start < HEADER.size + size:
                    return
                if count > len(self._fds):  # its descriptors came with its first byte: a bug
                    self._close()
                    return
                body = bytes(self._buffer[start + HEADER.size:start + HEADER.size + size])
                start += HEADER.size + size
                fds = [self._fds.popleft() for _ in range(count)]
                self._inbox.put_nowait((pickle.loads(body), fds))
        finally:
            del self._buffer[:start]

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        if self._writing:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(self.sock.fileno())
        self._outbox.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.sock.close()
        self._inbox.put_nowait(None)

    def close(self) -> None:
        self._close()
