"""Turns to receive a gRPC message (app.api.grpc_gate), and how a call that fails is answered
and counted (app.api.grpc_service)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

from app.api.grpc_gate import LOOKAHEAD_BYTES, ReceiveTurns, memory_bound_bytes, message_limit
from app.config import Settings
from app.errors import ReadTimeout
from app.metrics import Metrics
from app.trim import IdleTrimmer


async def test_turns_are_bounded_and_shared_between_connections() -> None:
    idle = []
    turns = ReceiveTurns(2, 1, on_idle=lambda: idle.append(True))
    await turns.take("attacker", 1)
    # The attacker's second call waits (one turn a connection); another connection's doesn't.
    waiting = asyncio.ensure_future(turns.take("attacker", 5))
    await asyncio.sleep(0)
    assert not waiting.done()
    await asyncio.wait_for(turns.take("good", 1), 0.1)
    assert turns.held == 2
    # All turns held: a third connection waits until its deadline.
    with pytest.raises(ReadTimeout):
        await turns.take("third", 0.05)
    turns.give_back("attacker")  # handed to the attacker's waiting call
    await asyncio.wait_for(waiting, 0.1)
    turns.give_back("attacker")
    turns.give_back("good")
    assert turns.held == 0 and idle == [True]


async def test_turns_go_in_arrival_order_and_a_cancelled_waiter_holds_none() -> None:
    turns = ReceiveTurns(1, 1)
    await turns.take("a", 1)
    order: list[str] = []

    async def wait(name: str) -> None:
        await turns.take(name, 5)
        order.append(name)

    gone = asyncio.ensure_future(turns.take("b", 5))
    first, second = asyncio.ensure_future(wait("c")), asyncio.ensure_future(wait("d"))
    await asyncio.sleep(0)
    gone.cancel()  # the client left while waiting
    await asyncio.sleep(0)
    turns.give_back("a")
    await asyncio.wait_for(first, 0.1)
    assert order == ["c"] and not second.done()
    turns.give_back("c")
    await asyncio.wait_for(second, 0.1)
    assert order == ["c", "d"] and turns.held == 1


def test_the_message_limit_and_the_memory_bound_follow_the_settings() -> None:
    settings = Settings(max_upload_bytes=1 << 20, max_batch_images=4, grpc_max_receiving=3,
                        grpc_max_connections=10, grpc_max_streams_per_connection=5)
    assert message_limit(settings) == 4 * ((1 << 20) + 4) + 64 * 1024
    assert message_limit(Settings()) == 80 * 1024 * 1024  # 16 x 16 MiB is over the ceiling
    assert message_limit(settings.model_copy(update={"grpc_max_message_bytes": 5000})) == 5000
    assert memory_bound_bytes(settings) == (7 * message_limit(settings)
                                            + 10 * 5 * LOOKAHEAD_BYTES)
    assert memory_bound_bytes(settings.model_copy(update={"grpc_port": 0})) == 0


class AbortError(Exception):
    pass


class Context:
    """A servicer context that hands over one message and records how the call ended."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.ended: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def read(self) -> bytes:
        return self.message

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.ended = (code, details)
        raise AbortError


class FailingRegistry:
    """Fault injection: a registry that fails in a way no client can cause."""

    def resolve(self, name: str, version: int | None) -> Any:
        raise RuntimeError("an unexpected failure")


async def test_an_unexpected_failure_is_internal_and_counted_as_500() -> None:
    from app.api.grpc_service import METHODS, InferenceService

    metrics = Metrics()
    state = SimpleNamespace(settings=Settings(), metrics=metrics, registry=FailingRegistry(),
                            draining=False)
    service = InferenceService(state, ReceiveTurns(1, 1), IdleTrimmer())  # type: ignore[arg-type]
    infer = next(m for m in METHODS if m.name == "ModelInfer")
    context = Context(pb.ModelInferRequest(model_name="m").SerializeToString())
    with pytest.raises(AbortError):
        await service._call(infer, context, service.ModelInfer)
    assert context.ended == (grpc.StatusCode.INTERNAL, "internal error")  # no traceback sent
    assert metrics.requests.labels("grpc:ModelInfer", "500", "", "")._value.get() == 1
    assert metrics.errors.labels(code="internal")._value.get() == 1
    assert service.turns.held == 0 and service.calls == 0


def test_grpc_core_gets_the_bounds_from_the_settings() -> None:
    from app.api.grpc_service import grpc_options

    settings = Settings(grpc_max_connections=7, grpc_max_streams_per_connection=9,
                        grpc_idle_timeout_s=2.5, header_timeout_s=4)
    options = dict(grpc_options(settings))
    assert options["grpc.max_receive_message_length"] == message_limit(settings)
    assert options["grpc.max_allowed_incoming_connections"] == 7
    assert options["grpc.max_concurrent_streams"] == 9
    assert options["grpc.max_connection_idle_ms"] == 2500
    assert options["grpc.server_handshake_timeout_ms"] == 4000
    assert options["grpc.http2.bdp_probe"] == 0
    assert options["grpc.http2.lookahead_bytes"] == LOOKAHEAD_BYTES
    assert options["grpc.compression_enabled_algorithms_bitset"] == 0b001  # identity only
    with_gzip = dict(grpc_options(settings.model_copy(update={"grpc_compression": True})))
    assert with_gzip["grpc.compression_enabled_algorithms_bitset"] == 0b111


async def test_a_connection_of_many_waiting_calls_delays_another_by_one_turn() -> None:
    """Round robin between connections: calls that send nothing, queued on one connection,
    do not each go before a call that came later on another (review of issue 25)."""
    turns = ReceiveTurns(1, 1)
    await turns.take("attacker", 1)
    queued = [asyncio.ensure_future(turns.take("attacker", 5)) for _ in range(8)]
    await asyncio.sleep(0)
    good = asyncio.ensure_future(turns.take("good", 5))
    await asyncio.sleep(0)
    turns.give_back("attacker")  # to the attacker's next call...
    await asyncio.wait_for(asyncio.wait(queued, return_when=asyncio.FIRST_COMPLETED), 0.1)
    assert sum(q.done() for q in queued) == 1 and not good.done()
    turns.give_back("attacker")  # ...then to the other connection, not its 7 others
    await asyncio.wait_for(good, 0.1)
    assert sum(q.done() for q in queued) == 1
    turns.give_back("good")
    for q in queued:
        q.cancel()


async def test_slow_turns_are_bounded_one_per_connection() -> None:
    turns = ReceiveTurns(4, 2, slow_slots=2)
    for connection in ("a", "a", "b", "c"):
        await turns.take(connection, 1)
    assert turns.go_slow("a") and not turns.go_slow("a")  # one slow call a connection
    assert turns.go_slow("b") and not turns.go_slow("c")  # two in all
    turns.give_back("a", slow=True)
    assert turns.go_slow("c")


async def test_a_turn_kept_for_a_parse_is_given_back_when_the_parse_ends() -> None:
    """A call cancelled while a thread parses its message: the turn stays held until the
    thread is done with the message (review of issue 25: cancelled calls had 4 messages in
    parse on one connection, whose bound is 2)."""
    from app.api.grpc_service import Turn

    turns = ReceiveTurns(1, 1)
    await turns.take("a", 1)
    turn = Turn(turns, "a")
    parse: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    turn.keep_until(parse)
    turn.give_back()  # what the cancelled call's cleanup does
    assert turns.held == 1
    parse.set_result(None)
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert turns.held == 0
