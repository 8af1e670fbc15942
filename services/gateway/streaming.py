"""Streaming a request's results: open each choice on a decode worker, turn its messages into text,
merge the choices.

    start_generation ── Dispatcher.open(choice) ──▶ ChoiceStream ──▶ Generation.updates()

Dispatcher: routes one choice and starts it on the worker's Session stream; the first message is
awaited there, so RESOURCE_EXHAUSTED (no KV room) or UNAVAILABLE (draining, gone) moves the choice
to the next worker as long as nothing was sent to the client.

ChoiceStream: per message it detokenizes the new ids once (multi-byte safe), runs the stop
strings over the new text once, and on a stop string cancels the decode call at once. It owns the
call and its route lease and releases both whichever way the choice ends.

Generation: with one choice (the common case) updates come straight from its stream; with n > 1
(or a batch of prompts) each choice is pumped by its own task into one queue, so a slow choice
never holds back the others. close() cancels whatever still runs: client disconnect, deadline,
error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING

from scalellm.text import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from scalellm.types import FinishReason, Timings, Usage
from scalellm.types.proto import (
    finish_reason_from_proto,
    logprobs_from_proto,
    sampling_to_proto,
    timings_from_proto,
)
from scalellm.v1 import common_pb2, worker_pb2
from services.gateway.request import ChoiceUpdate, ErrorKind, GatewayError, GenerationRequest, WorkerFailure
from services.gateway.routing import RouteLease, Router
from services.gateway.session import SessionCall, WorkerChannels

if TYPE_CHECKING:
    from services.gateway.core import GatewayMetrics


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
            route = self.router.route(len(prompt), tried, prompt=prompt)
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
            except WorkerFailure as exc:
                lease.release()
                if not exc.retryable:
                    raise exc.to_gateway_error(route.decode.worker_id) from exc
                self.metrics.retries.labels(exc.status.name).inc()
                tried.append(route.decode.worker_id)
                last = exc.to_gateway_error(route.decode.worker_id)
                continue
            except BaseException:  # cancelled while waiting: the worker must stop too
                call.cancel()
                lease.release()
                raise
            if first is None:
                lease.release()
                raise GatewayError(ErrorKind.INTERNAL, f"decode worker {route.decode.worker_id} sent nothing")
            lease.prefilled()
            self.metrics.observe_route(route, len(prompt))
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


# ---- one choice ----------------------------------------------------------------------------------


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
                    except WorkerFailure as exc:
                        raise exc.to_gateway_error(self.worker_id) from exc
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
            route = self._lease.route
            update.timings = replace(
                update.timings,
                gateway=self.gateway_s,
                remote_prefill=not route.local_prefill,
                prompt_blocks=route.prompt_blocks,
                routed_cached_blocks=route.cached_blocks,
                routed_ahead_tokens=route.ahead_tokens,
            )
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


# ---- every choice of a request -------------------------------------------------------------------


_DONE = object()


class Generation:
    """The running choices of one request. Iterate updates() once; always close() at the end."""

    def __init__(
        self, request: GenerationRequest, streams: list[ChoiceStream], metrics: GatewayMetrics
    ) -> None:
        self.request = request
        self.streams = streams
        self.metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        metrics.ttft.observe(min(s.first_at for s in streams) - request.received_at)
        metrics.prompt_tokens.inc(request.prompt_tokens)

    @property
    def finished(self) -> bool:
        return all(s.closed for s in self.streams)

    async def updates(self) -> AsyncIterator[ChoiceUpdate]:
        """Every choice's updates, interleaved as they come; GatewayError if a worker fails."""
        if len(self.streams) == 1:
            async for update in self.streams[0].updates():
                self._observe(self.streams[0], update)
                yield update
            return
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(s, queue)) for s in self.streams]
        remaining = len(self.streams)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, ChoiceUpdate)
                yield item

    async def _pump(self, stream: ChoiceStream, queue: asyncio.Queue[object]) -> None:
        try:
            async for update in stream.updates():
                self._observe(stream, update)
                queue.put_nowait(update)
            queue.put_nowait(_DONE)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            queue.put_nowait(exc)

    def _observe(self, stream: ChoiceStream, update: ChoiceUpdate) -> None:
        if update.finish is None:
            return
        tokens = stream.completion_tokens
        self.metrics.completion_tokens.inc(tokens)
        if tokens > 1:
            self.metrics.tpot.observe((stream.last_at - stream.first_at) / (tokens - 1))
        if update.timings is not None:
            self.metrics.overhead.observe(update.timings.gateway)
        if update.usage is not None and update.usage.cached_prompt_tokens:
            self.metrics.cached_prompt_tokens.labels(stream.worker_id).inc(update.usage.cached_prompt_tokens)
        if update.stop_str is not None:
            self.metrics.cancelled.labels("stop_string").inc()

    async def close(self, reason: str = "client") -> None:
        """Cancel every choice still running (reason: client, error, deadline) and wait for the pumps."""
        early = not self.finished
        for task in self._tasks:
            task.cancel()
        for stream in self.streams:
            stream.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if early:
            self.metrics.cancelled.labels(reason).inc()


async def start_generation(
    dispatcher: Dispatcher, request: GenerationRequest, timeout_s: float, metrics: GatewayMetrics
) -> Generation:
    """Open every choice (each has received its first message when this returns)."""
    deadline = time.perf_counter() + timeout_s
    sampling = sampling_to_proto(request.sampling)  # built once, shared by the choices
    if request.num_choices == 1:
        # Dispatched here and now: gather would wrap it in a task that starts only after every
        # callback already queued on the loop (under load, milliseconds of other streams' tokens).
        return Generation(request, [await dispatcher.open(request, 0, sampling, deadline)], metrics)
    opened = await asyncio.gather(
        *(dispatcher.open(request, i, _choice_sampling(sampling, i % request.sampling.n), deadline)
          for i in range(request.num_choices)),
        return_exceptions=True,
    )  # fmt: skip
    streams = [s for s in opened if isinstance(s, ChoiceStream)]
    failure = next((e for e in opened if isinstance(e, BaseException)), None)
    if failure is not None:
        for stream in streams:
            stream.close()
        raise failure
    return Generation(request, streams, metrics)


def _choice_sampling(sampling: common_pb2.SamplingParams, k: int) -> common_pb2.SamplingParams:
    """Choice k of a prompt samples with seed + k (as vLLM does): with one seed for all of them, n
    seeded choices would all be the same. Unseeded and first choices share the one message."""
    if k == 0 or not sampling.HasField("seed"):
        return sampling
    own = common_pb2.SamplingParams()
    own.CopyFrom(sampling)
    own.seed = (sampling.seed + k) % 2**63  # workers take seeds below 2**63
    return own
