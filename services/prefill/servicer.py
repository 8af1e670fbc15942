"""The PrefillWorker gRPC servicer: proto in, PrefillWorker, proto out."""

from __future__ import annotations

import grpc

from scalellm.v1 import worker_pb2, worker_pb2_grpc
from scalellm.worker.convert import logprobs_to_proto, sampling_from_proto
from scalellm.worker.errors import WrongWorker
from services.prefill.worker import KVTarget, PrefillWorker

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        dest = request.destination
        if request.prefill_worker_id and request.prefill_worker_id != self.worker.config.worker_id:
            raise WrongWorker(
                f"this is prefill worker {self.worker.config.worker_id}, not {request.prefill_worker_id}"
            )
        result = await self.worker.prefill(
            request.request_id,
            list(request.prompt_token_ids),
            sampling_from_proto(request.sampling),
            request.priority,
            KVTarget(
                dest.decode_worker_id,
                dest.transfer_endpoint,
                dest.transfer_id,
                dest.skip_blocks,
                tuple(dest.block_ids),
            ),
        )
        reply = worker_pb2.PrefillResponse(
            first_token_id=result.first_token_id,
            cached_prompt_tokens=result.cached_tokens,
            queue_seconds=result.queue_seconds,
            prefill_seconds=result.prefill_seconds,
            transfer_seconds=result.transfer.seconds,
            transfer_bytes=result.transfer.bytes,
        )
        if result.logprobs is not None:
            reply.first_token_logprobs.CopyFrom(logprobs_to_proto(result.logprobs))
        return reply
