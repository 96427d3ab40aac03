"""The boundary between front ends and the engine process (app.link): framed messages with
file descriptors over a real Unix socket pair, and shared-memory slot pools mapped twice."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import ClassVar

import numpy as np
import pytest

from app.errors import ImageTooLarge, Overloaded
from app.link.channel import Channel, ChannelClosed
from app.link.messages import Failed, Run, error_of, failed
from app.link.slots import SlotPool


async def test_messages_and_a_pool_cross_and_the_engine_reads_what_the_front_end_wrote() -> None:
    front_sock, engine_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front, engine = Channel(front_sock), Channel(engine_sock)
    pool = SlotPool.create("test", (3, 8, 8), 4)
    slot = pool.take()
    assert slot is not None
    pool.view(slot)[...] = 7.0
    front.send(Run(1, "m", 1, 0, slot, 8, 8, (8, 8), 1.0), fds=(pool.fd,))
    big = b"x" * (3 * 1024 * 1024)  # several reads, several writes
    front.send(big)
    message, fds = await asyncio.wait_for(engine.receive(), 10)
    assert isinstance(message, Run) and message.slot == slot and len(fds) == 1
    mapped = SlotPool.attach(fds[0], (3, 8, 8), 4)
    assert float(mapped.view(slot).sum()) == 7.0 * 3 * 8 * 8
    assert (await asyncio.wait_for(engine.receive(), 10))[0] == big
    front.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(engine.receive(), 10)
    mapped.close()
    pool.close()
    pool.close()  # twice is harmless


def test_slots_are_taken_given_back_and_recognised() -> None:
    pool = SlotPool.create("test", (3, 4, 4), 2)
    first, second = pool.take(), pool.take()
    assert {first, second} == {0, 1} and pool.take() is None
    assert pool.slot_of(pool.view(1)) == 1
    assert pool.slot_of(np.zeros((3, 4, 4), np.float32)) is None
    pool.give_back(1)
    assert pool.take() == 1
    with pytest.raises(IndexError):
        pool.view(2)
    pool.close()


def test_a_service_error_crosses_as_itself() -> None:
    error = error_of(failed(3, Overloaded(retry_after_s=4)))
    assert isinstance(error, Overloaded) and error.retry_after_s == 4
    assert isinstance(error_of(failed(3, ImageTooLarge("big"))), ImageTooLarge)
    assert error_of(Failed(3, "NoSuchError", "x")).status == 500


def test_a_memfd_pool_needs_no_name_on_disk() -> None:
    pool = SlotPool.create("dfine-test", (3, 2, 2), 1)
    assert os.readlink(f"/proc/self/fd/{pool.fd}").startswith("/memfd:dfine-test")
    pool.close()


async def test_descriptors_stay_with_their_message_when_one_read_returns_two() -> None:
    """A message without descriptors, then one with: both unread when the receiver reads, so
    one read returns the first frame's bytes with the second's descriptor."""
    front_sock, engine_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front, engine = Channel(front_sock), Channel(engine_sock)
    pool = SlotPool.create("test", (3, 4, 4), 1)
    front.send("first")
    front.send("second", fds=(pool.fd,))
    assert await asyncio.wait_for(engine.receive(), 10) == ("first", [])
    message, fds = await asyncio.wait_for(engine.receive(), 10)
    assert message == "second" and len(fds) == 1
    os.close(fds[0])
    front.close()
    engine.close()
    pool.close()


async def test_a_run_cancelled_in_the_same_read_as_it_came_is_answered() -> None:
    """The engine answers every run, even one whose task is cancelled before it starts (its
    Cancel read together with it): else the front end's slot would never come back. The
    engine's host is a stand-in here: the run never gets to use it."""
    from app.engine_process import FrontendSession
    from app.link.messages import Cancel

    class Host:
        sessions: ClassVar[set[object]] = set()

        def acked(self) -> None:
            pass

    front_sock, engine_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front, engine = Channel(front_sock), Channel(engine_sock)
    session = FrontendSession(Host(), engine)  # type: ignore[arg-type]
    serving = asyncio.get_running_loop().create_task(session.serve())
    front.send(Run(7, "m", 1, 1, 0, 10, 10, (10, 10), 5.0))
    front.send(Cancel(7))
    answer, _ = await asyncio.wait_for(front.receive(), 10)
    assert isinstance(answer, Failed) and answer.id == 7
    front.close()
    await asyncio.wait_for(serving, 10)
    assert session.runs == {}
