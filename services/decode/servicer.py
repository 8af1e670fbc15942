"""The DecodeWorker gRPC servicer: proto in, DecodeWorker, proto out. Errors are mapped by
scalellm.worker.errors.ErrorInterceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from scalellm.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from scalellm.worker.convert import finish_reason_to_proto, logprobs_to_proto, sampling_from_proto
from services.decode.worker import Chunk, DecodeWorker, PrefillTarget

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        if not request.request_id:
            raise ValueError("request_id must not be empty")
        chunks = self.worker.generate(
            request.request_id,
            list(request.prompt_token_ids),
            sampling_from_proto(request.sampling),
            request.priority,
            tuple(PrefillTarget(t.worker_id, t.address) for t in request.prefill),
        )
        async for chunk in chunks:
            yield to_proto(chunk)


def to_proto(chunk: Chunk) -> worker_pb2.GenerateResponse:
    msg = worker_pb2.GenerateResponse(
        token_ids=chunk.token_ids, logprobs=[logprobs_to_proto(lp) for lp in chunk.logprobs]
    )
    if chunk.finish is not None:
        msg.finish_reason = finish_reason_to_proto(chunk.finish)  # type: ignore[assignment]
        msg.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.completion_tokens,
                cached_prompt_tokens=chunk.cached_tokens,
            )
        )
        if chunk.timings is not None:
            t = chunk.timings
            msg.timings.CopyFrom(
                common_pb2.Timings(
                    queue=t.queue,
                    prefill=t.prefill,
                    transfer=t.transfer,
                    decode=t.decode,
                    transfer_bytes=t.transfer_bytes,
                )
            )
    return msg
