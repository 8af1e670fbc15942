"""serve_session: many requests over one DecodeWorker.Session stream.

    gateway                      serve_session                        engine
    generate(a) ──────────────▶ read() ── task run(a) ──────────────▶ a's chunks
    generate(b) ──────────────▶        ── task run(b) ──────────────▶ b's chunks
    cancel(a)   ──────────────▶        ── cancels run(a) (frees a's blocks)
                ◀── SessionResponse[update b, update c, ...] ◀── outbox ◀── every run() posts here

Each request runs as its own task, exactly as Generate would run it (`start` is the same message
stream), and posts its updates to one outbox. The writer sends everything posted since its last
write as one SessionResponse: after an engine step that is one message for every request on the
session instead of one per request, and a new request costs a message on an open stream instead of
a new call for the worker to accept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from contextlib import aclosing

import grpc

from scalellm.v1 import worker_pb2
from scalellm.worker.errors import status_of

log = logging.getLogger(__name__)

Start = Callable[[worker_pb2.GenerateRequest], AsyncGenerator[worker_pb2.GenerateResponse, None]]


class _Outbox:
    """Updates posted by the request tasks, taken all at once by the writer."""

    def __init__(self) -> None:
        self.updates: list[worker_pb2.SessionUpdate] = []
        self.wake = asyncio.Event()

    def post(self, update: worker_pb2.SessionUpdate) -> None:
        self.updates.append(update)
        self.wake.set()

    def take(self) -> list[worker_pb2.SessionUpdate]:
        updates, self.updates = self.updates, []
        return updates


async def serve_session(
    requests: AsyncIterable[worker_pb2.SessionRequest], start: Start
) -> AsyncGenerator[worker_pb2.SessionResponse, None]:
    """The Session rpc's responses for `requests`; start(request) streams one request's messages."""
    outbox = _Outbox()
    running: dict[str, asyncio.Task[None]] = {}

    async def run(request: worker_pb2.GenerateRequest) -> None:
        request_id = request.request_id
        try:
            async with aclosing(start(request)) as messages:
                async for message in messages:
                    outbox.post(worker_pb2.SessionUpdate(request_id=request_id, response=message))
        except asyncio.CancelledError:
            raise  # cancelled by the client (or the stream ended): nobody waits for an answer
        except Exception as exc:
            code, text = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("request %s failed", request_id, exc_info=exc)
            outbox.post(_error(request_id, code, text))
        finally:
            if running.get(request_id) is asyncio.current_task():
                del running[request_id]
            outbox.wake.set()

    async def read() -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "generate":
                    request_id = message.generate.request_id
                    if not request_id:
                        outbox.post(
                            _error("", grpc.StatusCode.INVALID_ARGUMENT, "request_id must not be empty")
                        )
                    elif (twin := running.pop(request_id, None)) is not None:
                        # Ids must be unique: the id's updates could no longer be told apart, so
                        # the running request stops too and the id's last update is this error.
                        twin.cancel()
                        why = f"request_id {request_id!r} is already running on this session"
                        outbox.post(_error(request_id, grpc.StatusCode.INVALID_ARGUMENT, why))
                    else:
                        running[request_id] = asyncio.create_task(run(message.generate))
                elif kind == "cancel" and (task := running.get(message.cancel)) is not None:
                    task.cancel()
        finally:
            outbox.wake.set()  # the client half-closed (or the stream broke): the writer decides

    reader = asyncio.create_task(read())
    try:
        while True:
            await outbox.wake.wait()
            outbox.wake.clear()
            if outbox.updates:
                yield worker_pb2.SessionResponse(updates=outbox.take())
            if reader.done() and not running and not outbox.updates:
                reader.result()  # re-raise a broken request stream
                return
    finally:
        tasks = [reader, *running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _error(request_id: str, code: grpc.StatusCode, text: str) -> worker_pb2.SessionUpdate:
    return worker_pb2.SessionUpdate(request_id=request_id, error_code=code.value[0], error_message=text)
