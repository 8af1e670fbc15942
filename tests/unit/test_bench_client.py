"""The serving benchmark client: SSE parsing, vLLM metric math, and runs against a tiny SSE server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bench.serving.client import RunConfig, arrival_gaps, payload, run, send
from bench.serving.metrics import SLO, RequestResult, Stat, summarize
from bench.serving.multiturn import Conversation, MultiTurnSpec, conversations, per_turn, run_conversations
from bench.serving.sse import SSEParser
from bench.serving.workload import BenchRequest, dataset_requests, random_requests


def test_sse_parser_handles_splits_crlf_comments_and_multiline() -> None:
    parser = SSEParser()
    assert parser.feed(b'data: {"a"') == []
    assert parser.feed(b": 1}\r\n\r\n: ping\n\nevent: x\ndata: one\ndata:two\n") == ['{"a": 1}']
    assert parser.feed(b"\ndata: [DONE]") == ["one\ntwo"]
    assert parser.close() == ["[DONE]"]


def test_tpot_follows_vllm() -> None:
    r = RequestResult(success=True, output_tokens=5, ttft=0.2, latency=1.0)
    assert r.tpot == pytest.approx(0.2)  # (1.0 - 0.2) / (5 - 1)
    assert RequestResult(success=True, output_tokens=1, ttft=0.2, latency=0.2).tpot is None


def test_summary_throughput_percentiles_and_goodput() -> None:
    results = [
        RequestResult(True, "", 10, 11, True, ttft=0.1 * (i + 1), latency=1.1 * (i + 1), itl=[0.1] * 10)
        for i in range(4)
    ] + [RequestResult(False, "HTTP 500")]
    s = summarize(results, duration_s=2.0, slo=SLO(ttft_ms=250, tpot_ms=150))
    assert (s.completed, s.failed) == (4, 1)
    assert s.total_input_tokens == 40 and s.total_output_tokens == 44
    assert s.request_throughput == 2.0 and s.output_throughput == 22.0
    assert s.total_token_throughput == 42.0
    assert s.ttft.mean_ms == pytest.approx(250.0) and s.ttft.median_ms == pytest.approx(250.0)
    assert s.ttft.p99_ms == pytest.approx(100 + 0.99 * 300)  # numpy's linear interpolation
    assert s.tpot.median_ms == pytest.approx(250.0)  # (1.1 - 0.1)(i + 1) / (11 - 1): 100..400 ms
    # TPOT of request i is (1.1 - 0.1)(i + 1) / 10 = 0.1 (i + 1) s: only i = 0 meets 150 ms; TTFT <= 250 ms
    assert s.goodput == pytest.approx(1 / 2.0)
    assert summarize(results, 2.0).goodput is None
    assert Stat.of([]) == Stat(0.0, 0.0, 0.0)


def test_arrivals_and_payload() -> None:
    assert arrival_gaps(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    gaps = arrival_gaps(2000, 10.0, 0)
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    body = payload(RunConfig("u", "m", ignore_eos=True, extra_body={"top_k": 1}), BenchRequest("hi", 1, 7))
    assert body["max_tokens"] == 7 and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["top_k"] == 1


def test_workloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    words = random_requests(3, 8, 4, tokenizer=None, seed=1)
    assert len(words) == 3 and all(len(r.prompt.split()) == 8 and r.output_len == 4 for r in words)
    assert words == random_requests(3, 8, 4, tokenizer=None, seed=1)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a b c", "output_len": 5}\n\n{"prompt": "d"}\n')
    rows = dataset_requests(str(data), 4, 9, seed=0)
    assert sorted((r.prompt, r.output_len) for r in rows) == [("a b c", 5)] * 2 + [("d", 9)] * 2


def events(texts: list[str], usage: dict[str, int] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"choices": [{"index": 0, "text": t}]} for t in texts]
    if usage is not None:
        out.append({"choices": [], "usage": usage})
    return out


class TinyServer:
    """POST /v1/completions streams the script chosen by the prompt, DELAY seconds per event.

    It notes (time.perf_counter, the client's clock too) when the last request came and when each
    of its events went out, so timing checks compare with what happened, not with DELAY.
    """

    DELAY = 0.02

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.inflight = self.peak = 0
        self.received = 0.0
        self.sent: list[float] = []

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.received, self.sent = time.perf_counter(), []
        body = await request.json()
        self.bodies.append(body)
        prompt = body["prompt"]
        if prompt == "http-error":
            return web.json_response({"error": {"message": "bad"}}, status=400)
        script = {
            "usage": events(["", "a", "b", "c"], {"prompt_tokens": 3, "completion_tokens": 4}),
            "no-usage": events(["x", "y"], None),
            "error": [*events(["a"], None), {"error": {"message": "worker died"}}],
        }[prompt]
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in script:
            await asyncio.sleep(self.DELAY)
            self.sent.append(time.perf_counter())  # before the write: the client reads it later
            await response.write(f"data: {json.dumps(event)}\r\n\r\n".encode())
        await response.write(b"data: [DONE]\n\n")
        self.inflight -= 1
        return response


@pytest.fixture
async def server():  # type: ignore[no-untyped-def]
    tiny = TinyServer()
    app = web.Application()
    app.router.add_post("/v1/completions", tiny.completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield tiny, RunConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_concurrency=2)
    await runner.cleanup()


async def test_send_times_content_chunks_and_reads_usage(server) -> None:  # type: ignore[no-untyped-def]
    tiny, config = server
    results, duration = await run(config, [BenchRequest("usage", 1, 4)], progress=False)
    r = results[0]
    assert r.success and r.usage_reported and r.text == "abc"
    assert (r.prompt_len, r.output_tokens) == (3, 4)  # from usage, not the 3 chunks
    # The first content ("a", event 1) was sent after the empty chunk: the empty one does not count.
    assert r.ttft >= tiny.sent[1] - tiny.received
    assert len(r.itl) == 2 and all(gap >= 0 for gap in r.itl)  # gaps between "a", "b" and "c" only
    assert r.ttft + sum(r.itl) >= tiny.sent[3] - tiny.received
    assert r.latency >= r.ttft + sum(r.itl) - 1e-6 and duration >= r.latency
    assert r.tpot == pytest.approx((r.latency - r.ttft) / 3)


async def test_fallbacks_and_failures(server) -> None:  # type: ignore[no-untyped-def]
    _, config = server
    import aiohttp

    async with aiohttp.ClientSession() as session:
        plain = await send(session, config, BenchRequest("no-usage", 5, 2))
        assert (
            plain.success and not plain.usage_reported and plain.output_tokens == 2 and plain.prompt_len == 5
        )
        failed = await send(session, config, BenchRequest("error", 1, 2))
        assert not failed.success and "worker died" in failed.error
        refused = await send(session, config, BenchRequest("http-error", 1, 2))
        assert not refused.success and refused.error.startswith("HTTP 400")


async def test_concurrency_is_bounded(server) -> None:  # type: ignore[no-untyped-def]
    tiny, config = server
    results, _ = await run(config, [BenchRequest("usage", 1, 4)] * 6, progress=False)
    assert all(r.success for r in results) and tiny.peak == 2 and len(tiny.bodies) == 6


class _Ids:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class _CharTokenizer:
    """One token per character (ord), enough to follow an answer into the next turn's history."""

    def encode(self, text: str, add_special_tokens: bool = False) -> _Ids:
        return _Ids([ord(c) for c in text])


@contextlib.asynccontextmanager
async def serve_completions(handler: Any) -> AsyncIterator[int]:
    """A tiny server with handler on /v1/completions; yields its port."""
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def test_multi_turn_conversations_grow_and_share_their_system_prompt() -> None:
    prompts: list[list[int]] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompts.append(body["prompt"])
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 2,
                 "prompt_tokens_details": {"cached_tokens": 16}}  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events(["A", "B"], usage):
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async with serve_completions(completions) as port:
        spec = MultiTurnSpec(
            conversations=3, turns=3, system_prompts=2, system_len=20, turn_len=5, output_len=2,
            arrival_rate=float("inf"), think_time_s=0.0,
        )  # fmt: skip
        convs = conversations(spec, vocab=1000, seed=3)
        assert convs[0].system == convs[2].system != convs[1].system and convs == conversations(spec, 1000, 3)
        config = RunConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_concurrency=2)
        results, _ = await run_conversations(config, spec, convs, _CharTokenizer())
    assert len(results) == 9 and all(r.result.success for r in results)
    first, second, third = (p for p in prompts if p[:25] == [*convs[0].system, *convs[0].users[0]])
    assert len(first) == 25 and second == [*first, ord("A"), ord("B"), *convs[0].users[1]]
    assert third[: len(second)] == second and len(third) == len(second) + 7
    rows = per_turn(results, 3)
    assert [r["completed"] for r in rows] == [3, 3, 3] and [r["prompt_tokens"] for r in rows] == [75, 96, 117]
    assert all(r["cached_tokens"] == 48 for r in rows)


def test_multi_turn_schedule_is_staggered_seeded_and_apart_from_the_ids() -> None:
    spec = MultiTurnSpec(
        conversations=400, turns=6, system_len=4, turn_len=3, arrival_rate=2.0, think_time_s=3.0
    )
    convs = conversations(spec, vocab=1000, seed=5)
    starts = [c.start_s for c in convs]
    assert starts[0] == 0.0 and starts == sorted(starts) and len(set(starts)) == len(starts)
    assert starts[-1] / (len(starts) - 1) == pytest.approx(0.5, rel=0.15)  # Poisson at 2/s
    thinks = [t for c in convs for t in c.think_s]
    assert all(len(c.think_s) == spec.turns - 1 for c in convs) and min(thinks) > 0
    assert sum(thinks) / len(thinks) == pytest.approx(3.0, rel=0.1)
    assert convs == conversations(spec, vocab=1000, seed=5)
    at_once = MultiTurnSpec(conversations=400, turns=6, system_len=4, turn_len=3, arrival_rate=float("inf"),
                            think_time_s=0.0)  # fmt: skip
    same_ids = conversations(at_once, vocab=1000, seed=5)
    assert all(c.start_s == 0.0 and set(c.think_s) == {0.0} for c in same_ids)
    assert [(c.system, c.users) for c in same_ids] == [(c.system, c.users) for c in convs]
    with pytest.raises(ValueError):
        MultiTurnSpec(arrival_rate=0.0)


async def test_multi_turn_waits_for_each_start_and_think_time() -> None:
    received: list[tuple[int, float]] = []  # (prompt length, when it came)
    answered: dict[int, float] = {}  # prompt length -> when its answer was written

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        received.append((len(body["prompt"]), time.perf_counter()))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events(["A"], {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1}):
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        answered[len(body["prompt"])] = time.perf_counter()
        return response

    # one conversation per system length, so a prompt's length says whose turn it is
    spec = MultiTurnSpec(conversations=3, turns=3, system_prompts=1, system_len=300, turn_len=5, output_len=1,
                         arrival_rate=5.0, think_time_s=0.2)  # fmt: skip
    convs = [
        Conversation(c.system[: 10 + 100 * i], c.users, c.start_s, c.think_s)
        for i, c in enumerate(conversations(spec, vocab=1000, seed=1))
    ]
    async with serve_completions(completions) as port:
        config = RunConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m")
        begun = time.perf_counter()
        results, _ = await run_conversations(config, spec, convs, _CharTokenizer())
    assert len(results) == 9 and all(r.result.success for r in results)
    for i, conv in enumerate(convs):
        lengths = [10 + 100 * i + 5, 10 + 100 * i + 11, 10 + 100 * i + 17]  # + user, + "A" + user, ...
        came = dict(received)
        assert came[lengths[0]] >= begun + conv.start_s  # lower bounds only: never flaky under load
        for turn in (1, 2):
            assert came[lengths[turn]] >= answered[lengths[turn - 1]] + conv.think_s[turn - 1]
