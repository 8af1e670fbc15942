"""What the worker service tests share: flags for a worker process on CPU, request building, calling
Generate to the end, and waiting until a worker's KV blocks are all free again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scalellm.redis_server import free_port
from scalellm.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.procs import Service, await_until


def worker_args(model: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--listen", "127.0.0.1:0", "--advertise-host", "127.0.0.1",
        "--transfer-listen", "127.0.0.1:0", "--num-kv-blocks", "400", "--num-threads", "1",
        "--metrics-port", str(free_port()), "--dtype", "float32", *extra,
    ]  # fmt: skip


def worker_request(
    rid: str, prompt: list[int], max_tokens: int, targets: list[worker_pb2.PrefillTarget], **sampling: Any
) -> worker_pb2.GenerateRequest:
    """A greedy request for max_tokens tokens (EOS ignored) unless sampling says otherwise."""
    return worker_pb2.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(
            **{"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True, **sampling}
        ),
        prefill=targets,
    )


async def generate(
    address: str, requests: list[worker_pb2.GenerateRequest]
) -> list[tuple[list[int], worker_pb2.GenerateResponse]]:
    """Run the requests concurrently to their end: each one's tokens and last message."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)

        async def one(req: worker_pb2.GenerateRequest) -> tuple[list[int], worker_pb2.GenerateResponse]:
            tokens: list[int] = []
            last = None
            async for msg in stub.Generate(req):
                tokens += msg.token_ids
                last = msg
            assert last is not None
            return tokens, last

        return await asyncio.gather(*(one(r) for r in requests))


async def wait_all_blocks_free(svc: Service) -> None:
    """Until every KV block of the worker is free (a hang guard fails it: blocks leaked)."""

    def free() -> bool:
        metrics = svc.metrics()
        return metrics["scalellm_kv_blocks_free"] == metrics["scalellm_kv_blocks_total"]

    await await_until(free, f"all KV blocks of {svc.name} free again (leaked?):\n{svc.log()}")


async def until_not_serving(channel: grpc.aio.Channel, service: str = "") -> None:
    """Watch the worker's health until it reports NOT_SERVING (it does on SIGTERM)."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))

    async def not_serving() -> None:
        async for reply in watch:
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
        raise AssertionError("the health watch ended before NOT_SERVING")

    try:
        await asyncio.wait_for(not_serving(), 60)  # a hang guard only
    finally:
        watch.cancel()
