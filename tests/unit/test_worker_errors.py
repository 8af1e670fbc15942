"""The worker's ErrorInterceptor: exceptions become statuses, and every handler style still works."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scalellm.v1 import worker_pb2, worker_pb2_grpc
from scalellm.worker.errors import ErrorInterceptor, ResourceExhausted


class Refusing(worker_pb2_grpc.DecodeWorkerServicer):
    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        yield worker_pb2.GenerateResponse(token_ids=[1])
        if request.request_id == "full":
            raise ResourceExhausted("no room")
        raise ValueError("bad prompt")


async def test_errors_become_statuses_and_the_health_watch_still_streams() -> None:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)
            for rid, code in (
                ("full", grpc.StatusCode.RESOURCE_EXHAUSTED),
                ("x", grpc.StatusCode.INVALID_ARGUMENT),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    [m async for m in stub.Generate(worker_pb2.GenerateRequest(request_id=rid))]
                assert err.value.code() is code
            # Health.Watch is a coroutine that writes with context.write(), not an async generator.
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            await checker.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
    finally:
        await server.stop(0)
