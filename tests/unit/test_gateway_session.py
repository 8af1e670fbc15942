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
            await asyncio.wait_for(call.read(), 60)  # a hang guard only
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


class _Ending(worker_pb2_grpc.DecodeWorkerServicer):
    """A Session that ends with `code` at once (refused, no headers) or, accepted, after the first
    request came."""

    def __init__(self, code: grpc.StatusCode, accept: bool) -> None:
        self.code, self.accept = code, accept

    async def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]
        if self.accept:
            await context.send_initial_metadata(())
            await anext(aiter(request_iterator))
        await context.abort(self.code, "scripted end")
        yield  # pragma: no cover - makes this an async generator, as a Session handler is


async def _first_error(code: grpc.StatusCode, accept: bool) -> WorkerFailure:
    server = grpc.aio.server()
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(_Ending(code, accept), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            session = WorkerSession(worker_pb2_grpc.DecodeWorkerStub(channel), "w")
            call = session.start(worker_pb2.GenerateRequest(request_id="r"), time.perf_counter() + 60)
            try:
                await asyncio.wait_for(call.read(), 60)  # a hang guard only
            except WorkerFailure as exc:
                await session.close()
                return exc
            raise AssertionError("the request on an ended stream must fail")
    finally:
        await server.stop(0)


async def test_a_refused_stream_fails_its_requests_with_the_refusal() -> None:
    """Refused before the worker took the stream (as the mesh token's interceptor refuses): the
    request fails with the worker's code, which the gateway reports (500 naming it, not a retry)."""
    err = await _first_error(grpc.StatusCode.UNAUTHENTICATED, accept=False)
    assert err.status is grpc.StatusCode.UNAUTHENTICATED and "scripted end" in err.details


async def test_an_accepted_stream_that_breaks_fails_its_requests_with_unavailable() -> None:
    """Whatever status a broken session ends with (a write racing the break reads as INTERNAL),
    its requests fail with UNAVAILABLE: retried elsewhere before their first token, 503 after."""
    err = await _first_error(grpc.StatusCode.INTERNAL, accept=True)
    assert err.status is grpc.StatusCode.UNAVAILABLE and "INTERNAL scripted end" in err.details, err


class _Recording(worker_pb2_grpc.DecodeWorkerServicer):
    """A Session that takes every message (its requests never produce a token) and ends when the
    gateway half-closes."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []
        self.half_closed = False

    async def Session(self, request_iterator, context):  # type: ignore[no-untyped-def]
        await context.send_initial_metadata(())
        async for message in request_iterator:
            self.received.append((message.WhichOneof("kind"), message.cancel or message.generate.request_id))
        self.half_closed = True
        return
        yield  # pragma: no cover - makes this an async generator, as a Session handler is


async def test_a_finished_session_still_cancels_the_requests_running_on_it() -> None:
    """finish() (the worker left the registry, e.g. its lease lapsed) half-closes only once no
    request runs: a client that leaves meanwhile still stops its request on the worker. The cancel
    used to queue behind the half-close and never go out, and the worker generated on for nobody."""
    worker = _Recording()
    server = grpc.aio.server()
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            session = WorkerSession(worker_pb2_grpc.DecodeWorkerStub(channel), "w")
            calls = [
                session.start(worker_pb2.GenerateRequest(request_id=r), time.perf_counter() + 60)
                for r in "ab"
            ]
            await _until(lambda: len(worker.received) == 2)
            session.finish()
            calls[0].cancel()
            await _until(lambda: ("cancel", "a") in worker.received)
            assert not worker.half_closed and session.running == 1
            calls[1].cancel()  # the last request: its cancel goes out, then the half-close
            await _until(lambda: worker.half_closed and session.closed)
            assert worker.received == [("generate", "a"), ("generate", "b"), ("cancel", "a"), ("cancel", "b")]
    finally:
        await server.stop(0)
