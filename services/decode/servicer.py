"""The DecodeWorker gRPC servicer: proto in, DecodeWorker, proto out. Errors are mapped by
scalellm.worker.errors.ErrorInterceptor (Generate) or per request (Session, services/decode/session.py).

A stream's reader may be slower than the engine's steps (a busy gateway, a slow network, this
process's own event loop behind the step thread): then the request's tokens wait in its event
queue, and every token already waiting when a message is built goes into that message (the
GenerateResponse fields are repeated) instead of one message per token. A reader that keeps up
still gets one message per step, with no waiting added.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

import grpc

from scalellm.types.proto import (
    finish_reason_to_proto,
    logprobs_to_proto,
    prefill_target_from_proto,
    sampling_from_proto,
    tenant_from_proto,
    timings_to_proto,
    usage_to_proto,
)
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from services.decode.session import serve_session
from services.decode.worker import Chunk, DecodeWorker

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        async with aclosing(self.messages(request)) as messages:
            async for message in messages:
                yield message

    async def Session(
        self, request_iterator: AsyncIterator[worker_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.SessionResponse]:
        await context.send_initial_metadata(())  # accepted: the gateway writes only after this
        async with aclosing(serve_session(request_iterator, self.messages)) as responses:
            async for response in responses:
                yield response

    async def messages(
        self, request: worker_pb2.GenerateRequest
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        """One request's messages, for Generate and for each request of a Session."""
        if not request.request_id:
            raise ValueError("request_id must not be empty")
        chunks = self.worker.generate(
            request.request_id,
            list(request.prompt_token_ids),
            sampling_from_proto(request.sampling),
            request.priority,
            tuple(prefill_target_from_proto(t) for t in request.prefill),
            tuple(request.resume_token_ids),
            tenant=tenant_from_proto(request.tenant, request.tenant_weight),
        )
        queued, request_id = self.worker.host.aengine.queued, request.request_id
        async with aclosing(coalesce(chunks, lambda: queued(request_id) > 0)) as messages:
            async for message in messages:
                yield message


async def coalesce(
    chunks: AsyncGenerator[Chunk, None], ready: Callable[[], bool]
) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
    """One message per chunk, plus each following chunk while ready() says one is already there
    (so taking it does not wait). Token order is kept, logprobs stay aligned with their tokens, and
    the finish (usage, timings) goes on the message that carries the last token, which ends it."""
    async with aclosing(chunks) as stream:  # closed at once, however the call ends
        async for chunk in stream:
            message = to_proto(chunk)
            while chunk.finish is None and ready():
                try:
                    chunk = await anext(stream)
                except StopAsyncIteration:
                    break
                _append(message, chunk)
            yield message
            if chunk.finish is not None:
                return  # the stream is complete (closing the chunks ends the worker's side)


def to_proto(chunk: Chunk) -> worker_pb2.GenerateResponse:
    msg = worker_pb2.GenerateResponse(
        token_ids=chunk.token_ids, logprobs=[logprobs_to_proto(lp) for lp in chunk.logprobs]
    )
    msg.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in chunk.prompt_logprobs)
    if chunk.finish is not None:
        _finish(msg, chunk)
    return msg


def _append(msg: worker_pb2.GenerateResponse, chunk: Chunk) -> None:
    msg.token_ids.extend(chunk.token_ids)
    msg.logprobs.extend(logprobs_to_proto(lp) for lp in chunk.logprobs)
    msg.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in chunk.prompt_logprobs)
    if chunk.finish is not None:
        _finish(msg, chunk)


def _finish(msg: worker_pb2.GenerateResponse, chunk: Chunk) -> None:
    msg.finish_reason = finish_reason_to_proto(chunk.finish)
    if chunk.usage is not None:
        msg.usage.CopyFrom(usage_to_proto(chunk.usage))
    if chunk.timings is not None:
        msg.timings.CopyFrom(timings_to_proto(chunk.timings))
