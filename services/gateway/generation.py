"""Generation: every choice of one request, started together and read as one stream of updates.

With one choice (the common case) updates come straight from its decode stream; with n > 1 (or a
batch of prompts) each choice is pumped by its own task into one queue, so a slow choice never
holds back the others. close() cancels whatever still runs: client disconnect, deadline, error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from scalellm.types.proto import sampling_to_proto
from scalellm.v1 import common_pb2
from services.gateway.choice import ChoiceStream
from services.gateway.dispatch import Dispatcher
from services.gateway.metrics import GatewayMetrics
from services.gateway.request import GenerationRequest
from services.gateway.results import ChoiceUpdate

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
