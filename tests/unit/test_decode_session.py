"""serve_session on its own, over a scripted start() (one function under test): cancels and the
stream's end, with requests that never produce a token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from scalellm.v1 import worker_pb2
from services.decode.session import serve_session

started: list[str] = []


async def _forever(request: worker_pb2.GenerateRequest) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
    started.append(request.request_id)
    await asyncio.Event().wait()  # a request whose prompt is still being prefilled
    yield worker_pb2.GenerateResponse()  # pragma: no cover - never reached


async def _serve(messages: list[worker_pb2.SessionRequest]) -> list[worker_pb2.SessionResponse]:
    async def requests() -> AsyncGenerator[worker_pb2.SessionRequest, None]:
        for message in messages:
            yield message  # back to back, as when they arrive together

    return [r async for r in serve_session(requests(), _forever)]


def _generate(request_id: str) -> worker_pb2.SessionRequest:
    return worker_pb2.SessionRequest(generate=worker_pb2.GenerateRequest(request_id=request_id))


async def test_a_request_cancelled_before_it_started_lets_the_session_end() -> None:
    """A cancel read right behind its generate stops a task that never ran a step: the session must
    still end once the client half-closes (it used to wait for that request forever)."""
    started.clear()
    cancel = worker_pb2.SessionRequest(cancel="a")
    responses = await asyncio.wait_for(_serve([_generate("a"), cancel]), 30)  # a hang guard
    assert responses == [] and started == []


async def test_a_running_request_cancelled_before_the_half_close_lets_the_session_end() -> None:
    started.clear()

    async def requests() -> AsyncGenerator[worker_pb2.SessionRequest, None]:
        yield _generate("a")
        while not started:
            await asyncio.sleep(0.01)
        yield worker_pb2.SessionRequest(cancel="a")

    responses = [r async for r in serve_session(requests(), _forever)]
    assert responses == [] and started == ["a"]
