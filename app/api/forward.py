"""FRONTENDS > 1: the server-side streams live in front end 0 (they are state: a source read
once, its tracks, its subscribers), so the other front ends hand every HTTP request under
/streams to it, over a Unix socket in the service's private directory, and relay its answer as
it comes (Server-Sent Events and the MJPEG preview included). Clients' frames
(/streams/client, a WebSocket) hold no shared state and are served where they land.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import h11
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STREAMS_SOCKET_NAME = "streams.sock"
MAX_BODY_BYTES = 64 * 1024  # a stream's request is a small JSON body
READ_CHUNK = 65536
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade",
              b"proxy-connection", b"trailer"}


def is_streams_path(scope: Scope) -> bool:
    if scope["type"] != "http":  # lifespan and WebSocket scopes pass (the latter served here)
        return False
    path: str = scope["path"]
    return path == "/streams" or path.startswith("/streams/")


class ForwardStreams:
    """Outermost middleware of front ends 1..N-1: /streams requests go to front end 0 (which
    counts, logs and authorizes them, once)."""

    def __init__(self, app: ASGIApp, socket_path: Path) -> None:
        self.app, self.socket_path = app, socket_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_streams_path(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await _body(receive)
        except ValueError:
            await _answer(send, 413, "payload_too_large", "a stream's request is 64 KiB at most")
            return
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
        except OSError:
            await _answer(send, 503, "not_ready", "the streams' front end is restarting: "
                                                  "retry later")
            return
        relay = asyncio.create_task(_relay(scope, body, reader, writer, send))
        gone = asyncio.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, gone):
                task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if relay.done() and not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()  # type: ignore[misc]


async def _body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ValueError
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _relay(scope: Scope, body: bytes, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, send: Send) -> None:
    connection = h11.Connection(h11.CLIENT)
    target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP
               and k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"connection", b"close"))
    if not any(k.lower() == b"host" for k, _ in headers):
        headers.append((b"host", b"frontend-0"))
    writer.write(connection.send(h11.Request(method=scope["method"], target=target,
                                             headers=headers)))
    writer.write(connection.send(h11.Data(data=body)) or b"")
    writer.write(connection.send(h11.EndOfMessage()))
    await writer.drain()
    started = False
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:  # front end 0 went away mid-answer
            event = h11.ConnectionClosed()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(READ_CHUNK))
            continue
        if isinstance(event, h11.Response):
            await send({"type": "http.response.start", "status": event.status_code,
                        "headers": [(k, v) for k, v in event.headers
                                    if k.lower() not in HOP_BY_HOP]})
            started = True
        elif isinstance(event, h11.Data):
            await send({"type": "http.response.body", "body": bytes(event.data),
                        "more_body": True})
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await _answer(send, 503, "not_ready", "the streams' front end went away")
            return


async def _answer(send: Send, status: int, code: str, message: str) -> None:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    start: Message = {"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    await send(start)
    await send({"type": "http.response.body", "body": body})
