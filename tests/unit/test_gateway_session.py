"""WorkerSession on its own: a stream that breaks fails its requests and leaves nothing behind."""

from __future__ import annotations

import asyncio
import time

import grpc

from scalellm.redis_server import free_port
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.request import ErrorKind, WorkerFailure
from services.gateway.session import WorkerSession


async def _until(predicate, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def] - a hang guard
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_a_broken_stream_fails_its_requests_and_leaks_no_task() -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:  # nobody listens
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        before = len(asyncio.all_tasks())

        idle = WorkerSession(stub, "nowhere")  # breaks with nothing running on it
        await _until(lambda: idle.closed)

        busy = WorkerSession(stub, "nowhere")
        call = busy.start(worker_pb2.GenerateRequest(request_id="r"), time.perf_counter() + 30)
        try:
            await asyncio.wait_for(call.read(), 10)
        except WorkerFailure as exc:
            assert exc.status is grpc.StatusCode.UNAVAILABLE and exc.retryable, exc
        else:
            raise AssertionError("a request on a stream that never opened must fail")
        assert busy.closed and busy.running == 0

        # Nothing waits on the dead streams any more (grpc's tasks end on the next loop turns).
        await _until(lambda: len(asyncio.all_tasks()) == before)


def test_a_worker_failure_reaches_the_client_as_its_kind() -> None:
    """The worker's status decides the client's error (HTTP status and gRPC code through ErrorKind)
    and whether another worker may be tried; the worker's own words stay in the message."""
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: (ErrorKind.INVALID, False),
        grpc.StatusCode.DEADLINE_EXCEEDED: (ErrorKind.TIMEOUT, False),
        grpc.StatusCode.RESOURCE_EXHAUSTED: (ErrorKind.OVERLOADED, True),
        grpc.StatusCode.UNAVAILABLE: (ErrorKind.UNAVAILABLE, True),
        grpc.StatusCode.CANCELLED: (ErrorKind.INTERNAL, False),
        grpc.StatusCode.INTERNAL: (ErrorKind.INTERNAL, False),
    }
    for status, (kind, retryable) in cases.items():
        failure = WorkerFailure(status, "the worker's words")
        error = failure.to_gateway_error("d1")
        assert (error.kind, failure.retryable) == (kind, retryable), status
        if kind is ErrorKind.INVALID:
            assert error.message == "the worker's words"  # the client's own mistake, as the worker put it
        elif kind is not ErrorKind.TIMEOUT:
            assert f"decode worker d1: {status.name}: the worker's words" in error.message
