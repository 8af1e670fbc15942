"""WorkerSession on its own: a stream that breaks fails its requests and leaves nothing behind."""

from __future__ import annotations

import asyncio
import time

import grpc

from scalellm.redis_server import free_port
from scalellm.v1 import worker_pb2, worker_pb2_grpc
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
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
        else:
            raise AssertionError("a request on a stream that never opened must fail")
        assert busy.closed and busy.running == 0

        # Nothing waits on the dead streams any more (grpc's tasks end on the next loop turns).
        await _until(lambda: len(asyncio.all_tasks()) == before)
