"""Streaming a request's results: open each choice on a decode worker, turn its messages into text,
merge the choices.

    start_generation ── Dispatcher.open(choice) ──▶ ChoiceStream ──▶ Generation.updates()

Dispatcher: routes one choice and starts it on the worker's Session stream; the first message is
awaited there, so RESOURCE_EXHAUSTED (no KV room) or UNAVAILABLE (draining, gone) moves the choice
to the next worker as long as nothing was sent to the client.

ChoiceStream: per message it detokenizes the new ids once (multi-byte safe), runs the stop
strings over the new text once, and on a stop string cancels the decode call at once. It owns the
call and its route lease and releases both whichever way the choice ends. If its worker fails
mid-stream, it migrates: the choice continues on another worker from the tokens already sent
(at most --migration-limit times).

Generation: with one choice (the common case) updates come straight from its stream; with n > 1
(or a batch of prompts) each choice is pumped by its own task into one queue, so a slow choice
never holds back the others. close() cancels whatever still runs: client disconnect, deadline,
error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import grpc

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


@dataclass(slots=True)
class StartedCall:
    """A decode call that has sent its first message, with the route lease it holds."""

    call: SessionCall
    lease: RouteLease
    first: worker_pb2.GenerateResponse
    dispatched_at: float


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
        migration_limit: int = 3,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.router = router
        self.channels = channels
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.metrics = metrics
        self.attempts = attempts
        self.migration_limit = migration_limit

    async def open(
        self,
        request: GenerationRequest,
        index: int,
        sampling: common_pb2.SamplingParams,
        deadline: float,
    ) -> ChoiceStream:
        """Start choice `index` (deadline: a time.perf_counter() value); GatewayError if no worker can."""
        started = await self.start(request, index, sampling, deadline)
        return ChoiceStream(self, request, index, sampling, deadline, started)

    async def start(
        self,
        request: GenerationRequest,
        index: int,
        sampling: common_pb2.SamplingParams,
        deadline: float,
        resume: Sequence[int] = (),
        exclude: Collection[str] = (),
    ) -> StartedCall:
        """Route choice `index` and start it, trying up to `attempts` decode workers (never one in
        exclude). resume: the output a failed worker already streamed (migration); the new
        worker computes prompt + resume itself, so no prefill worker is asked."""
        prompt = request.prompt_of(index)
        tried: list[str] = list(exclude)
        last: GatewayError | None = None
        dispatched_at = 0.0
        for _ in range(self.attempts):
            route = self.router.route(
                len(prompt) + len(resume),
                tried,
                prompt=(*prompt, *resume),
                cache_salt=request.sampling.cache_salt,
            )
            if route is None:
                break
            if resume:  # computed where it resumes, never on a prefill worker
                route = replace(route, prefill=(), prefill_cached_blocks=0)
            message = worker_pb2.GenerateRequest(
                request_id=f"{request.request_id}-{index}",
                prompt_token_ids=prompt,
                sampling=sampling,
                priority=request.priority,
                tenant=request.tenant,
                tenant_weight=request.tenant_weight,
                prefill=[] if resume else [
                    worker_pb2.PrefillTarget(worker_id=p.worker_id, address=p.address) for p in route.prefill
                ],
                resume_token_ids=resume,
            )  # fmt: skip
            lease = self.router.acquire(route, len(prompt) + len(resume))
            dispatched_at = dispatched_at or time.perf_counter()
            call = self.channels.session(route.decode.address).start(message, deadline)
            try:
                first = await call.read()
            except WorkerFailure as exc:
                lease.release()
                if not exc.retryable:
                    raise exc.to_gateway_error(route.decode.worker_id, request.param_names) from exc
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
            self.metrics.observe_route(route, len(prompt) + len(resume))
            return StartedCall(call, lease, first, dispatched_at)
        if last is not None:
            raise last
        raise GatewayError(ErrorKind.OVERLOADED, "every decode worker was tried and none could take it")


# ---- one choice ----------------------------------------------------------------------------------


class ChoiceStream:
    """One running choice. Iterate updates() once; close() cancels it (idempotent).

    Migration: if its decode worker dies, drains past its cut-off or its stream breaks after
    tokens were sent, the choice continues on another worker from what was streamed:

        worker A: p0..pn -> o0 o1 o2 X (stream broke)
        worker B: p0..pn o0 o1 o2 (computed again, resume_token_ids) -> o3 o4 ... finish

    The detokenizer and stop strings keep their state, so the client sees one stream with no
    token repeated or missing; greedy and seeded choices continue exactly (the engine counts the
    resumed tokens as output: max_tokens, penalties and seeded draws carry over).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        request: GenerationRequest,
        index: int,
        sampling: common_pb2.SamplingParams,
        deadline: float,
        started: StartedCall,
    ) -> None:
        self.request = request
        self.index = index
        self._dispatcher = dispatcher
        self._sampling = sampling
        self._deadline = deadline
        self._call = started.call
        self._lease = started.lease
        self.worker_id = started.lease.route.decode.worker_id
        self._first: worker_pb2.GenerateResponse | None = started.first
        prompt = request.prompt_of(index)
        params = self._params = request.sampling
        self._detok = IncrementalDetokenizer(
            dispatcher.tokenizer, params.skip_special_tokens, prompt_ids=prompt
        )
        self._stop = (
            StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        )
        self._prompt_len = len(prompt)
        self._output: list[int] = []  # every token sent so far (what a migration resumes)
        self.migrations = 0
        self.completion_tokens = 0
        self.dispatched_at = started.dispatched_at
        self.first_at = time.perf_counter()
        self.last_at = self.first_at
        self.gateway_s = started.dispatched_at - request.received_at  # grows with per-message work
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
        """The choice's updates, the last one finished; GatewayError if the worker fails (and the
        choice cannot migrate)."""
        try:
            while True:
                msg = await self._next()
                update = self._process(msg)
                yield update
                if update.finish is not None:
                    return
        finally:
            self.close()

    async def _next(self) -> worker_pb2.GenerateResponse:
        """The worker's next message; after a failure that migration covers, the next message
        of the worker that took the choice over."""
        while True:
            msg, self._first = self._first, None
            if msg is None:
                try:
                    msg = await self._call.read()
                except WorkerFailure as exc:
                    failure = exc.to_gateway_error(self.worker_id, self.request.param_names)
                    if exc.status is not grpc.StatusCode.UNAVAILABLE or not self._can_migrate():
                        raise failure from exc
                    await self._migrate("unavailable", failure)
                    continue
                if msg is None:
                    failure = GatewayError(ErrorKind.INTERNAL, f"decode worker {self.worker_id} ended early")
                    if not self._can_migrate():
                        raise failure
                    await self._migrate("ended_early", failure)
                    continue
                self.last_at = time.perf_counter()
            if msg.finish_reason == common_pb2.FINISH_REASON_ABORT and not msg.token_ids:
                self._ended = True  # drained past its cut-off or stopping: the worker is done with it
                failure = GatewayError(
                    ErrorKind.UNAVAILABLE, f"decode worker {self.worker_id} aborted the request"
                )
                if not self._can_migrate():
                    raise failure
                await self._migrate("aborted", failure)
                continue
            return msg

    def _can_migrate(self) -> bool:
        return self.migrations < self._dispatcher.migration_limit and time.perf_counter() < self._deadline

    async def _migrate(self, reason: str, failure: GatewayError) -> None:
        """Continue on another worker from the tokens sent so far (the failed one excluded), its
        first message next; raises `failure` if no worker takes the choice."""
        failed = self.worker_id
        self._call.cancel()
        self._lease.release()
        try:
            started = await self._dispatcher.start(
                self.request, self.index, self._sampling, self._deadline, self._output, exclude=(failed,)
            )
        except GatewayError as exc:
            self.closed = True  # nothing left to cancel or release
            raise failure from exc
        self.migrations += 1
        self._dispatcher.metrics.migrations.labels(reason).inc()
        self._call, self._lease, self._ended = started.call, started.lease, False
        self.worker_id = started.lease.route.decode.worker_id
        self._first = started.first
        self.last_at = time.perf_counter()

    def _process(self, msg: worker_pb2.GenerateResponse) -> ChoiceUpdate:
        start = time.perf_counter()
        ids = msg.token_ids
        self._output.extend(ids)
        self.completion_tokens += len(ids)
        finish = finish_reason_from_proto(msg.finish_reason)
        shown: Sequence[int] = ids
        if finish is FinishReason.STOP:  # the token that stopped it is not shown (as in vLLM)
            shown = self._params.shown_ids(ids, True, self._dispatcher.eos_token_ids)
        text = self._detok.add(shown) if shown else ""
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
        if msg.prompt_logprobs:
            update.prompt_logprobs = [logprobs_from_proto(lp) for lp in msg.prompt_logprobs]
        if finish is not None:
            self._ended = stop_str is None
            update.usage, update.timings = self._final(msg, stop_str is not None)
        end = time.perf_counter()
        self.gateway_s += end - start
        if update.timings is not None:
            route = self._lease.route
            update.timings = replace(
                update.timings,
                gateway=self.gateway_s,
                total=end - self.request.received_at,  # the last message's own work included
                remote_prefill=not route.local_prefill,
                prompt_blocks=route.prompt_blocks,
                routed_cached_blocks=route.cached_blocks,
                routed_ahead_tokens=route.ahead_tokens,
            )
        return update

    def _final(self, msg: worker_pb2.GenerateResponse, cut: bool) -> tuple[Usage, Timings]:
        """The request's usage and timings, `total` and `gateway` left for _process to set."""
        worker_call = self.last_at - self.dispatched_at
        if not cut and msg.HasField("usage"):
            u = msg.usage
            usage = Usage(u.prompt_tokens or self._prompt_len, u.completion_tokens, u.cached_prompt_tokens)
            worker = timings_from_proto(msg.timings)
            return usage, replace(worker, worker_call=worker_call, migrations=self.migrations)
        # Cut by a stop string (the worker's own summary never comes): count and time it here.
        usage = Usage(self._prompt_len, self.completion_tokens)
        timings = Timings(
            prefill=self.first_at - self.dispatched_at,
            decode=self.last_at - self.first_at,
            worker_call=worker_call,
            migrations=self.migrations,
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
        metrics.tenant_tokens.labels(request.tenant, "prompt").inc(request.prompt_tokens)

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
        self.metrics.tenant_tokens.labels(self.request.tenant, "completion").inc(tokens)
        if tokens > 1:
            self.metrics.tpot.observe((stream.last_at - stream.first_at) / (tokens - 1))
        if update.timings is not None:
            self.metrics.overhead.observe(update.timings.gateway)
        if update.usage is not None and update.usage.cached_prompt_tokens:
            self.metrics.observe_cached_prompt(stream.worker_id, update.usage.cached_prompt_tokens)
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
