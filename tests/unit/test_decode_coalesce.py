"""Decode streams: tokens already waiting when a message is built travel in that one message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from scalellm.engine.config import EngineConfig
from scalellm.registry import WorkerRole
from scalellm.types import FinishReason, Timings, TokenLogprobs, Usage
from scalellm.v1 import common_pb2, worker_pb2
from scalellm.worker.config import WorkerConfig
from scalellm.worker.engine_host import EngineHost
from scalellm.worker.metrics import WorkerMetrics
from services.decode.servicer import DecodeServicer, coalesce
from services.decode.worker import Chunk, DecodeWorker


def _chunk(token: int, finish: FinishReason | None = None) -> Chunk:
    lp = TokenLogprobs(token, -0.5 * token, ((token, -0.5 * token), (token + 100, -9.0)))
    if finish is None:
        return Chunk([token], [lp])
    return Chunk([token], [lp], finish, Usage(7, 5, 3), Timings(queue=0.1, prefill=0.2, decode=0.3))


async def test_ready_chunks_join_the_message_in_order_with_their_logprobs() -> None:
    chunks = [_chunk(t) for t in (10, 11, 12, 13)] + [_chunk(14, FinishReason.LENGTH)]
    # ready() answers "is the next chunk already there?" after each chunk taken: 11 and 12 wait
    # behind 10; 13 comes alone; 14 (the finish) waits behind 13.
    waiting = iter([True, True, False, True])
    taken: list[int] = []

    async def source() -> AsyncGenerator[Chunk, None]:
        for chunk in chunks:
            taken.append(chunk.token_ids[0])
            yield chunk

    messages = [m async for m in coalesce(source(), lambda: next(waiting))]

    assert [list(m.token_ids) for m in messages] == [[10, 11, 12], [13, 14]]
    for m in messages:
        assert [lp.token_id for lp in m.logprobs] == list(m.token_ids)
        assert [[t.token_id for t in lp.top] for lp in m.logprobs] == [[t, t + 100] for t in m.token_ids]
        assert [lp.logprob for lp in m.logprobs] == [-0.5 * t for t in m.token_ids]
    assert messages[0].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    assert not messages[0].HasField("usage") and not messages[0].HasField("timings")
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_prompt_tokens) == (
        7,
        5,
        3,
    )
    assert (last.timings.queue, last.timings.prefill, last.timings.decode) == (0.1, 0.2, 0.3)
    assert taken == [10, 11, 12, 13, 14]


async def test_nothing_is_taken_past_the_finish_and_a_keeping_up_reader_gets_one_per_chunk() -> None:
    async def source() -> AsyncGenerator[Chunk, None]:
        yield _chunk(1)
        yield _chunk(2, FinishReason.STOP)
        yield _chunk(3)  # never sent: a stream ends with its finish

    always = [m async for m in coalesce(source(), lambda: True)]
    assert [list(m.token_ids) for m in always] == [[1, 2]]
    assert always[0].finish_reason == common_pb2.FINISH_REASON_STOP

    async def three() -> AsyncGenerator[Chunk, None]:
        for t in (1, 2):
            yield _chunk(t)
        yield _chunk(3, FinishReason.LENGTH)

    never = [m async for m in coalesce(three(), lambda: False)]
    assert [list(m.token_ids) for m in never] == [[1], [2], [3]]


async def test_closing_the_messages_closes_the_chunk_stream_at_once() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncGenerator[Chunk, None]:
        try:
            for t in range(100):
                yield _chunk(t)
        finally:
            closed.set()

    messages = coalesce(source(), lambda: False)
    assert list((await anext(messages)).token_ids) == [0]
    await messages.aclose()
    assert closed.is_set()


class _Context:
    """What DecodeServicer.Generate reads of a grpc.aio.ServicerContext (nothing yet)."""


async def test_a_slow_reader_gets_the_engines_tokens_in_fewer_messages(tiny_llama: Path) -> None:
    """A real engine on its step thread while this event loop stalls: the tokens that queued up
    come in one message, exactly the tokens (and logprobs) a reader that keeps up gets."""
    config = WorkerConfig(
        role=WorkerRole.BOTH,
        engine=EngineConfig(model=str(tiny_llama), num_kv_blocks=64, block_size=4, num_threads=1),
    )
    host = EngineHost(config, WorkerMetrics())
    worker = DecodeWorker(config, host, WorkerMetrics())
    servicer = DecodeServicer(worker)
    host.start()
    try:
        sampling = common_pb2.SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)

        def request(rid: str) -> worker_pb2.GenerateRequest:
            return worker_pb2.GenerateRequest(
                request_id=rid, prompt_token_ids=[5, 17, 99, 3, 42, 8], sampling=sampling
            )

        async def read(rid: str, stall: bool) -> list[worker_pb2.GenerateResponse]:
            out: list[Any] = []
            async for message in servicer.Generate(request(rid), _Context()):  # type: ignore[arg-type]
                out.append(message)
                if stall and len(out) == 1:
                    # Block the event loop until the engine has generated every token: the steps
                    # go on on their thread, their events wait to be delivered to the stream.
                    deadline = time.monotonic() + 120  # a hang guard only
                    while host.engine.has_unfinished() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    # A command runs on the step thread after the last step handed its events
                    # to the loop: once it ran, every delivery is queued.
                    host.aengine.barrier().result(timeout=120)
                    await asyncio.sleep(0)  # the queued deliveries run first
            return out

        keeping_up = await read("keep", stall=False)
        slow = await read("slow", stall=True)
    finally:
        host.stop()

    def tokens(messages: list[worker_pb2.GenerateResponse]) -> list[int]:
        return [t for m in messages for t in m.token_ids]

    assert len(tokens(keeping_up)) == len(tokens(slow)) == 24
    assert tokens(slow) == tokens(keeping_up)  # greedy: same tokens, same order
    assert len(slow) == 2  # what came before the stall, then everything that queued during it
    for m in slow:
        assert [lp.token_id for lp in m.logprobs] == list(m.token_ids)
    logprobs = [lp.logprob for m in slow for lp in m.logprobs]
    assert logprobs == pytest.approx([lp.logprob for m in keeping_up for lp in m.logprobs], abs=1e-4)
    for messages in (slow, keeping_up):
        *body, last = messages
        assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in body)
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == 24 and last.usage.prompt_tokens == 6
        assert last.timings.decode > 0
