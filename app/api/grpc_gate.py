"""Turns to receive a gRPC request message.

gRPC reads a message whole before the code sees it, and a stream whose message is being read
gets flow-control window for all of it (up to the message limit), so the bytes that partial
messages hold are bounded by how many calls read at once. The service's methods are
registered as client-streaming (the wire is the same for a unary client), so a call starts
when its headers arrive and its message is read only once it holds a turn; until then its
stream holds at most the connection's initial window (``grpc.http2.lookahead_bytes``).

Turns are handed over in arrival order, and one connection may hold only part of them at
once. A turn is held for a short while only (UPLOAD_HOLD_MS for ModelInfer, SMALL_HOLD_S for
the other calls, whose message comes with their headers): a call whose message is still
arriving then goes on as one of a few slow ones (at most half of ModelInfer's turns, one per
connection), or is cut off. So calls that send headers and nothing more, from however many
connections, make the others wait a second at most, never until their deadline; and health
checks and the small calls have turns of their own, never behind inference uploads.
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
# Health checks, and the calls other than ModelInfer, have turns of their own (one per
# connection), so that inference uploads never hold them up.
HEALTH_TURNS = 2
SMALL_TURNS = 2
# How long those calls may hold a turn: their message (a name, a flag) comes with the headers.
SMALL_HOLD_S = 0.25


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
    for each turn to receive (health checks' and small calls' included), and the initial
    window of every other stream the connections may open. Admitted calls hold places,
    counted as REST's."""
    if not settings.grpc_port:
        return 0
    turns = settings.grpc_max_receiving + HEALTH_TURNS + SMALL_TURNS
    receiving = turns * message_limit(settings)
    waiting = (settings.grpc_max_connections * settings.grpc_max_streams_per_connection
               * LOOKAHEAD_BYTES)
    return receiving + waiting


class ReceiveTurns:
    """At most ``slots`` holders at once, and ``per_connection`` of them from one connection;
    the others wait, in arrival order among connections that may take one, until their
    deadline. Of the holders, ``slow_slots`` at most (one per connection) may go on past
    their hold time (``go_slow``)."""

    def __init__(self, slots: int, per_connection: int, slow_slots: int = 0,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.slots = slots
        self.per_connection = max(1, min(per_connection, slots))
        self.slow_slots = slow_slots
        self.slow = 0
        self._slow_by: set[str] = set()
        self.held = 0
        self._held_by: dict[str, int] = {}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}  # in turn order
        self.on_idle = on_idle

    def _may_take(self, connection: str) -> bool:
        return (self.held < self.slots
                and self._held_by.get(connection, 0) < self.per_connection)

    def _grant(self, connection: str) -> None:
        self.held += 1
        self._held_by[connection] = self._held_by.get(connection, 0) + 1

    async def take(self, connection: str, timeout_s: float) -> None:
        """A turn for a call on ``connection``, or ReadTimeout once ``timeout_s`` passed."""
        if self._may_take(connection) and connection not in self._waiting:
            self._grant(connection)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(connection, deque()).append(waiter)
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
            queue = self._waiting.get(connection)
            if queue is not None:
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
                if not queue:
                    del self._waiting[connection]

    def go_slow(self, connection: str) -> bool:
        """Whether a holder on ``connection`` whose message is still arriving after its hold
        time may go on receiving it (then ``give_back(connection, slow=True)``)."""
        if self.slow >= self.slow_slots or connection in self._slow_by:
            return False
        self.slow += 1
        self._slow_by.add(connection)
        return True

    def give_back(self, connection: str, slow: bool = False) -> None:
        if slow:
            self.slow -= 1
            self._slow_by.discard(connection)
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
        """Free turns to the waiting connections in turn (round robin: a connection served
        goes to the back), each call of a connection in arrival order; so a connection with
        many calls waiting delays another's by one turn each, not by all of its calls."""
        for connection in list(self._waiting):
            if self.held >= self.slots:
                return
            if not self._may_take(connection):
                continue
            queue = self._waiting.pop(connection)
            while queue and queue[0].done():  # timed out or cancelled meanwhile
                queue.popleft()
            if queue:
                self._grant(connection)
                queue.popleft().set_result(None)
            if queue:
                self._waiting[connection] = queue
