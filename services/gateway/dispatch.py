"""Dispatcher: opens one choice on a decode worker, moving to the next worker on RESOURCE_EXHAUSTED
(no KV room) or UNAVAILABLE (draining, gone) as long as no token was received."""

from __future__ import annotations

import time

import grpc

from scalellm.text import Tokenizer
from scalellm.v1 import common_pb2, worker_pb2
from services.gateway.channels import WorkerChannels
from services.gateway.choice import ChoiceStream, worker_error
from services.gateway.errors import ErrorKind, GatewayError
from services.gateway.metrics import GatewayMetrics
from services.gateway.request import GenerationRequest
from services.gateway.routing import Router

_RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


class Dispatcher:
    """Routes and starts decode streams; the first message is awaited here, so that a worker's
    refusal surfaces before anything was sent to the client and can still be retried elsewhere."""

    def __init__(
        self,
        router: Router,
        channels: WorkerChannels,
        tokenizer: Tokenizer,
        metrics: GatewayMetrics,
        attempts: int = 3,
    ) -> None:
        self.router = router
        self.channels = channels
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.attempts = attempts

    async def open(
        self,
        request: GenerationRequest,
        index: int,
        sampling: common_pb2.SamplingParams,
        deadline: float,
    ) -> ChoiceStream:
        """Start choice `index` (deadline: a time.perf_counter() value); GatewayError if no worker can."""
        prompt = request.prompt_of(index)
        tried: list[str] = []
        last: GatewayError | None = None
        dispatched_at = 0.0
        for _ in range(self.attempts):
            route = self.router.route(len(prompt), tried)
            if route is None:
                break
            message = worker_pb2.GenerateRequest(
                request_id=f"{request.request_id}-{index}",
                prompt_token_ids=prompt,
                sampling=sampling,
                priority=request.priority,
                prefill=[
                    worker_pb2.PrefillTarget(worker_id=p.worker_id, address=p.address) for p in route.prefill
                ],
            )
            lease = self.router.acquire(route, len(prompt))
            dispatched_at = dispatched_at or time.perf_counter()
            call = self.channels.session(route.decode.address).start(message, deadline)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                lease.release()
                if exc.code() not in _RETRYABLE:
                    raise worker_error(exc, route.decode.worker_id) from exc
                self.metrics.retries.labels(exc.code().name).inc()
                tried.append(route.decode.worker_id)
                last = worker_error(exc, route.decode.worker_id)
                continue
            except BaseException:  # cancelled while waiting: the worker must stop too
                call.cancel()
                lease.release()
                raise
            if first is None:
                lease.release()
                raise GatewayError(ErrorKind.INTERNAL, f"decode worker {route.decode.worker_id} sent nothing")
            return ChoiceStream(
                request,
                index,
                self.tokenizer,
                call,
                lease,
                first,
                dispatched_at=dispatched_at,
                first_at=time.perf_counter(),
            )
        if last is not None:
            raise last
        raise GatewayError(ErrorKind.OVERLOADED, "every decode worker was tried and none could take it")
