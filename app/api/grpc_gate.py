"""Turns to receive a gRPC request message.

gRPC reads a message whole before the code sees it, and a stream whose message is being read
gets flow-control window for all of it (up to the message limit), so the bytes that partial
messages hold are bounded by how many calls read at once. The service's methods are
registered as client-streaming (the wire is the same for a unary client), so a call starts
when its headers arrive and its message is read only once it holds a turn; until then its
stream holds at most the connection's initial window (``grpc.http2.lookahead_bytes``).

Turns are handed over in arrival order, but one connection may hold only part of them at
once: 64 streams that send headers and nothing more, all on one connection, hold that part
until their deadline, and calls on other connections go on receiving.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from app.config import Settings
from app.errors import ReadTimeout

# Names, datatypes, shapes, parameters: what a request message may hold beside its tensors.
MAX_OVERHEAD_BYTES = 64 * 1024
# A stream waiting for its turn holds at most this much of its message: its initial
# flow-control window (gRPC's BDP probing, which grows it to megabytes, is turned off).
LOOKAHEAD_BYTES = 4 * 1024
# Health checks have turns of their own, so that inference calls never hold them up.
HEALTH_TURNS = 2


# The automatic message limit's ceiling: a FP32 batch of 16 images at 640x640 (78.6 MB) and
# its names fit; every receive turn may hold this much, so it is what partial messages cost.
AUTO_MESSAGE_CEILING_BYTES = 80 * 1024 * 1024


def message_limit(settings: Settings) -> int:
    """The largest request message: GRPC_MAX_MESSAGE_BYTES, or what a call of the most
    images carries (MAX_BATCH_IMAGES files of MAX_UPLOAD_BYTES, each with its 4-byte length,
    and the names and shapes around them) up to AUTO_MESSAGE_CEILING_BYTES."""
    if settings.grpc_max_message_bytes:
        return settings.grpc_max_message_bytes
    most_images = settings.max_batch_images * (settings.max_upload_bytes + 4)
    return min(most_images + MAX_OVERHEAD_BYTES, AUTO_MESSAGE_CEILING_BYTES)


def memory_bound_bytes(settings: Settings) -> int:
    """What gRPC calls may hold before they are admitted (docs: "Memory"): a whole message
    for each turn to receive (health checks' included), and the initial window of every
    other stream the connections may open. Admitted calls hold places, counted as REST's."""
    if not settings.grpc_port:
        return 0
    receiving = (settings.grpc_max_receiving + HEALTH_TURNS) * message_limit(settings)
    waiting = (settings.grpc_max_connections * settings.grpc_max_streams_per_connection
               * LOOKAHEAD_BYTES)
    return receiving + waiting


class ReceiveTurns:
    """At most ``slots`` holders at once, and ``per_connection`` of them from one connection;
    the others wait, in arrival order among connections that may take one, until their
    deadline."""

    def __init__(self, slots: int, per_connection: int,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.slots = slots
        self.per_connection = max(1, min(per_connection, slots))
        self.held = 0
        self._held_by: dict[str, int] = {}
        self._waiting: deque[tuple[str, asyncio.Future[None]]] = deque()
        self.on_idle = on_idle

    def _may_take(self, connection: str) -> bool:
        return (self.held < self.slots
                and self._held_by.get(connection, 0) < self.per_connection)

    def _grant(self, connection: str) -> None:
        self.held += 1
        self._held_by[connection] = self._held_by.get(connection, 0) + 1

    async def take(self, connection: str, timeout_s: float) -> None:
        """A turn for a call on ``connection``, or ReadTimeout once ``timeout_s`` passed."""
        if self._may_take(connection):
            self._grant(connection)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (connection, waiter)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(waiter, max(0.0, timeout_s))  # granted: the turn is ours
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # granted just as time ran out
                self.give_back(connection)
            raise ReadTimeout("the request message did not arrive in time") from None
        except asyncio.CancelledError:  # the client left while waiting
            if waiter.done() and not waiter.cancelled():
                self.give_back(connection)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(entry)

    def give_back(self, connection: str) -> None:
        self.held -= 1
        left = self._held_by[connection] - 1
        if left:
            self._held_by[connection] = left
        else:
            del self._held_by[connection]
        self._hand_over()
        if self.held == 0 and self.on_idle is not None:
            self.on_idle()

    def _hand_over(self) -> None:
        """Turns to the longest waiting calls whose connection may take one."""
        for entry in list(self._waiting):
            if self.held >= self.slots:
                return
            connection, waiter = entry
            if waiter.done() or not self._may_take(connection):
                continue
            self._waiting.remove(entry)
            self._grant(connection)
            waiter.set_result(None)
