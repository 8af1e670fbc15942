"""The PrefillWorker gRPC servicer: proto in, PrefillWorker, proto out."""

from __future__ import annotations

import grpc

from scalellm.types.proto import (
    kv_destination_from_proto,
    prefill_result_to_proto,
    sampling_from_proto,
    tenant_from_proto,
)
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from scalellm.worker.errors import WrongWorker
from services.prefill.worker import PrefillWorker

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        if request.prefill_worker_id and request.prefill_worker_id != self.worker.config.worker_id:
            raise WrongWorker(
                f"this is prefill worker {self.worker.config.worker_id}, not {request.prefill_worker_id}"
            )
        result = await self.worker.prefill(
            request.request_id,
            list(request.prompt_token_ids),
            sampling_from_proto(request.sampling),
            request.priority,
            kv_destination_from_proto(request.destination),
            tenant=tenant_from_proto(request.tenant, request.tenant_weight),
        )
        return prefill_result_to_proto(result)
