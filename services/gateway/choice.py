"""ChoiceStream: one choice's decode stream turned into text updates.

Per message it detokenizes the new ids once (multi-byte safe), runs the stop strings over the new
text once, and on a stop string cancels the decode call at once. It owns the call and its route
lease and releases both whichever way the choice ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from scalellm.text import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from scalellm.types import FinishReason, Timings, Usage
from scalellm.types.proto import finish_reason_from_proto, logprobs_from_proto, timings_from_proto
from scalellm.v1 import worker_pb2
from services.gateway.errors import ErrorKind, GatewayError
from services.gateway.request import GenerationRequest
from services.gateway.results import ChoiceUpdate
from services.gateway.routing import RouteLease
from services.gateway.session import SessionCall


def worker_error(exc: grpc.aio.AioRpcError, worker_id: str) -> GatewayError:
    """A decode worker's failure as the gateway reports it."""
    code = exc.code()
    detail = f"decode worker {worker_id}: {code.name}: {exc.details()}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return GatewayError(ErrorKind.INVALID, exc.details() or detail)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(ErrorKind.TIMEOUT, "the request ran past its deadline", code="timeout")
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError(ErrorKind.OVERLOADED, f"no decode worker has KV room ({detail})")
    if code is grpc.StatusCode.UNAVAILABLE:
        return GatewayError(ErrorKind.UNAVAILABLE, detail)
    return GatewayError(ErrorKind.INTERNAL, detail)


class ChoiceStream:
    """One running choice. Iterate updates() once; close() cancels it (idempotent)."""

    def __init__(
        self,
        request: GenerationRequest,
        index: int,
        tokenizer: Tokenizer,
        call: SessionCall,
        lease: RouteLease,
        first: worker_pb2.GenerateResponse,
        *,
        dispatched_at: float,
        first_at: float,
    ) -> None:
        self.request = request
        self.index = index
        self.worker_id = lease.route.decode.worker_id
        self._call = call
        self._lease = lease
        self._first: worker_pb2.GenerateResponse | None = first
        prompt = request.prompt_of(index)
        sampling = request.sampling
        self._detok = IncrementalDetokenizer(tokenizer, sampling.skip_special_tokens, prompt_ids=prompt)
        self._stop = (
            StopStringMatcher(sampling.stop, sampling.include_stop_str_in_output) if sampling.stop else None
        )
        self._prompt_len = len(prompt)
        self.completion_tokens = 0
        self.dispatched_at = dispatched_at
        self.first_at = first_at
        self.last_at = first_at
        self.gateway_s = dispatched_at - request.received_at  # grows with per-message work
        self.closed = False
        self._ended = False  # the worker sent its last message: nothing to cancel

    def close(self) -> None:
        """Cancel the decode call (unless it ended by itself) and release the route."""
        if not self.closed:
            self.closed = True
            if not self._ended:
                self._call.cancel()
            self._lease.release()

    async def updates(self) -> AsyncIterator[ChoiceUpdate]:
        """The choice's updates, the last one finished; GatewayError if the worker fails."""
        try:
            while True:
                msg = self._first
                if msg is None:
                    try:
                        msg = await self._call.read()
                    except grpc.aio.AioRpcError as exc:
                        raise worker_error(exc, self.worker_id) from exc
                    if msg is None:
                        raise GatewayError(ErrorKind.INTERNAL, f"decode worker {self.worker_id} ended early")
                    self.last_at = time.perf_counter()
                self._first = None
                update = self._process(msg)
                yield update
                if update.finish is not None:
                    return
        finally:
            self.close()

    def _process(self, msg: worker_pb2.GenerateResponse) -> ChoiceUpdate:
        start = time.perf_counter()
        ids = msg.token_ids
        self.completion_tokens += len(ids)
        text = self._detok.add(ids) if ids else ""
        finish = finish_reason_from_proto(msg.finish_reason)
        if finish is FinishReason.ABORT or (finish is None and msg.finish_reason):
            raise GatewayError(ErrorKind.UNAVAILABLE, f"decode worker {self.worker_id} aborted the request")
        if finish is not None:
            text += self._detok.flush()
        stop_str = None
        if self._stop is not None:
            text, stop_str = self._stop.add(text)
            if stop_str is not None:
                finish = FinishReason.STOP
                self._call.cancel()  # no more tokens are needed
            elif finish is not None:
                text += self._stop.flush()
        logprobs = [logprobs_from_proto(lp) for lp in msg.logprobs] if msg.logprobs else ()
        update = ChoiceUpdate(self.index, ids, text, logprobs, finish, stop_str)
        if finish is not None:
            self._ended = stop_str is None
            update.usage, update.timings = self._final(msg, stop_str is not None)
        self.gateway_s += time.perf_counter() - start
        if update.timings is not None:
            update.timings = replace(update.timings, gateway=self.gateway_s)
        return update

    def _final(self, msg: worker_pb2.GenerateResponse, cut: bool) -> tuple[Usage, Timings]:
        total = self.last_at - self.request.received_at
        worker_call = self.last_at - self.dispatched_at
        if not cut and msg.HasField("usage"):
            u = msg.usage
            usage = Usage(u.prompt_tokens or self._prompt_len, u.completion_tokens, u.cached_prompt_tokens)
            worker = timings_from_proto(msg.timings)
            return usage, replace(worker, total=total, worker_call=worker_call)
        # Cut by a stop string (the worker's own summary never comes): count and time it here.
        usage = Usage(self._prompt_len, self.completion_tokens)
        timings = Timings(
            prefill=self.first_at - self.dispatched_at,
            decode=self.last_at - self.first_at,
            total=total,
            worker_call=worker_call,
        )
        return usage, timings
