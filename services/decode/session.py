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
import functools
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from contextlib import aclosing

import grpc

from scalellm.types import InvalidParameter
from scalellm.v1 import worker_pb2
from scalellm.worker.errors import reported_status

Start = Callable[[worker_pb2.GenerateRequest], AsyncGenerator[worker_pb2.GenerateResponse, None]]


class _Outbox:
    """The next SessionResponse, filled by the request tasks and taken whole by the writer (each
    update is built in place: one copy of a request's message, not one per wrapper)."""

    def __init__(self) -> None:
        self.response = worker_pb2.SessionResponse()
        self.wake = asyncio.Event()

    def output(self, request_id: str, message: worker_pb2.GenerateResponse) -> None:
        self.response.updates.add(request_id=request_id, response=message)
        self.wake.set()

    def error(self, request_id: str, code: grpc.StatusCode, text: str, param: str = "") -> None:
        self.response.updates.add(
            request_id=request_id, error_code=code.value[0], error_message=text, error_param=param
        )
        self.wake.set()

    def __len__(self) -> int:
        return len(self.response.updates)

    def take(self) -> worker_pb2.SessionResponse:
        response, self.response = self.response, worker_pb2.SessionResponse()
        return response


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
                    outbox.output(request_id, message)
        except asyncio.CancelledError:
            raise  # cancelled by the client (or the stream ended): nobody waits for an answer
        except Exception as exc:
            param = exc.field if isinstance(exc, InvalidParameter) else ""
            outbox.error(request_id, *reported_status(exc, f"request {request_id}"), param=param)

    def ended(request_id: str, task: asyncio.Task[None]) -> None:
        # A done callback, not a finally in run(): a task cancelled before its first step never
        # runs its body, and would stay "running" (the session would never end).
        if running.get(request_id) is task:
            del running[request_id]
        outbox.wake.set()

    async def read() -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "generate":
                    request_id = message.generate.request_id
                    if not request_id:
                        outbox.error("", grpc.StatusCode.INVALID_ARGUMENT, "request_id must not be empty")
                    elif (twin := running.pop(request_id, None)) is not None:
                        # Ids must be unique: the id's updates could no longer be told apart, so
                        # the running request stops too and the id's last update is this error.
                        twin.cancel()
                        why = f"request_id {request_id!r} is already running on this session"
                        outbox.error(request_id, grpc.StatusCode.INVALID_ARGUMENT, why)
                    else:
                        task = running[request_id] = asyncio.create_task(run(message.generate))
                        task.add_done_callback(functools.partial(ended, request_id))
                elif kind == "cancel" and message.cancel in running:
                    running[message.cancel].cancel()
        finally:
            outbox.wake.set()  # the client half-closed (or the stream broke): the writer decides

    reader = asyncio.create_task(read())
    try:
        while True:
            await outbox.wake.wait()
            outbox.wake.clear()
            if outbox:
                yield outbox.take()
            if reader.done() and not running and not outbox:
                reader.result()  # re-raise a broken request stream
                return
    finally:
        tasks = [reader, *running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
