"""The gateway (in-process, its real code) in front of real decode worker processes on a tiny model
with the demo tokenizer: n > 1, logprobs, stop token ids, cancellation by stop string, disconnect
and deadline, retries on RESOURCE_EXHAUSTED and UNAVAILABLE and the --route-attempts cap, a
worker dying mid-stream, and a worker with async scheduling. Every answer is compared with the engine alone on the same model.

A tiny model generates thousands of tokens per request here (max_tokens LONG): a request that is
still running when the test cancels it has thousands of steps left, so "the worker stopped early"
is read from its generated-token counter, never from the clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jsonschema
import openai
import pytest

from scalellm import LLM, SamplingParams
from scalellm.redis_server import free_port
from scalellm.text import bad_words_token_ids
from scalellm.types import StructuredOutput
from scalellm.types.proto import sampling_to_proto
from scalellm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2_grpc
from services.gateway.config import GatewayConfig
from services.gateway.openai_format import parse_events
from services.gateway.server import GatewayServer
from tests.fake_prefill import FakePrefill, Mode
from tests.procs import Service, await_until, start_service
from tests.service.worker_calls import until_not_serving, worker_args, worker_request

pytestmark = pytest.mark.slow

LONG = 8000  # tokens a cancelled request would still generate (the tiny model's context is 8192)
PROMPT = "The tiny model says"


def _dead() -> str:
    return f"127.0.0.1:{free_port()}"  # nobody listens: UNAVAILABLE at once


@pytest.fixture(scope="module")
def engine(tiny_chat_model: Path) -> LLM:
    """The engine alone on the same weights: what every answer through the gateway must equal."""
    return LLM(model=str(tiny_chat_model), num_kv_blocks=200, dtype="float32")  # as worker_args


def _sampling(**kw: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "ignore_eos": True, **kw})


@pytest.fixture(scope="module")
def worker(tiny_chat_model: Path) -> Iterator[Service]:
    svc = start_service(
        "services.decode", worker_args(tiny_chat_model, "--role", "both", "--num-kv-blocks", "1200")
    )
    yield svc
    assert svc.stop() == 0, svc.log()


@dataclass
class Gateway:
    """An in-process gateway, its served model name and an official OpenAI client on it."""

    server: GatewayServer
    model: str
    client: openai.AsyncOpenAI

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def metrics(self) -> str:
        assert self.server.core is not None
        return self.server.core.metrics.render().decode()

    async def complete(self, prompt: str | list[int], **kw: Any) -> Any:
        """A greedy completion (EOS ignored) unless kw says otherwise."""
        kw = {"temperature": 0, "extra_body": {"ignore_eos": True}, **kw}
        return await self.client.completions.create(model=self.model, prompt=prompt, **kw)

    def long_stream(self) -> dict[str, Any]:
        """The body of a streamed completion that would run LONG tokens."""
        return {"model": self.model, "prompt": PROMPT, "max_tokens": LONG, "stream": True, "ignore_eos": True}


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway(tiny_chat_model: Path) -> AsyncIterator[GatewayFactory]:
    """Start in-process gateways over the given workers (GatewayConfig fields as keywords)."""
    started: list[Gateway] = []

    async def start(*decode: str, **config: Any) -> Gateway:
        settings = {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "model": str(tiny_chat_model)}
        server = GatewayServer(GatewayConfig(**settings, decode_addrs=decode, **config))
        await server.start()
        url = f"http://127.0.0.1:{server.http_port}/v1"
        gw = Gateway(
            server, tiny_chat_model.name, openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        )
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.client.close()
        await gw.server.stop(0)


def requests_served(worker: Service) -> float:
    return sum(v for k, v in worker.metrics().items() if k.startswith("scalellm_requests_total"))


async def test_n_seeded_choices_each_equal_the_engine_with_its_own_seed(
    gateway: GatewayFactory, worker: Service, engine: LLM
) -> None:
    """Choice k of a seeded request samples with seed + k (as vLLM does): distinct choices, each
    reproducible with the engine alone."""
    gw = await gateway(worker.address)
    out = await gw.complete(PROMPT, n=3, temperature=1.0, seed=42, max_tokens=12)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    expected = [
        engine.generate(PROMPT, _sampling(temperature=1.0, seed=42 + k, max_tokens=12))[0].outputs[0].text
        for k in range(3)
    ]
    assert texts == expected
    assert len(set(texts)) == 3


async def test_logprobs_equal_the_engines(gateway: GatewayFactory, worker: Service, engine: LLM) -> None:
    gw = await gateway(worker.address)
    expected = engine.generate(PROMPT, _sampling(max_tokens=6, logprobs=3))[0].outputs[0]
    assert expected.logprobs is not None
    async with grpc.aio.insecure_channel(gw.grpc) as channel:
        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True)
        messages = [
            m
            async for m in gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GatewayGenerateRequest(text=PROMPT, sampling=sampling)
            )
        ]
    got = [lp for m in messages for lp in m.logprobs]
    assert [lp.token_id for lp in got] == expected.token_ids
    for lp, want in zip(got, expected.logprobs, strict=True):
        assert lp.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [t.token_id for t in lp.top] == [t for t, _ in want.top]
        assert [t.logprob for t in lp.top] == pytest.approx([v for _, v in want.top], abs=1e-4)


async def test_stop_token_ids_end_the_choice(gateway: GatewayFactory, worker: Service, engine: LLM) -> None:
    greedy = engine.generate(PROMPT, _sampling(max_tokens=24))[0].outputs[0].token_ids
    at = next(i for i in range(3, len(greedy)) if greedy[i] not in greedy[:i])  # a first occurrence
    stop_id = greedy[at]
    gw = await gateway(worker.address)
    out = await gw.complete(
        PROMPT, max_tokens=24, extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]}
    )
    want = engine.generate(PROMPT, _sampling(max_tokens=24, stop_token_ids=[stop_id]))[0].outputs[0]
    assert want.token_ids == greedy[: at + 1]  # the engine alone stops on it, and so must the mesh
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == at + 1
    assert out.choices[0].text == want.text


async def _stopped_early(worker: Service, before: float) -> float:
    """The worker's batch is empty again and it generated far fewer than LONG tokens since before
    (how many it generated is returned)."""
    await await_until(lambda: worker.metric("scalellm_running_batch") == 0, "the worker's batch drained")
    generated = worker.metric("scalellm_generated_tokens_total") - before
    assert generated < LONG / 2, generated
    return generated


async def test_a_stop_string_cancels_the_worker(
    gateway: GatewayFactory, worker: Service, engine: LLM
) -> None:
    text = engine.generate(PROMPT, _sampling(max_tokens=40))[0].outputs[0].text
    stop = text[len(text) // 3 : len(text) // 3 + 3]
    gw = await gateway(worker.address)
    before = worker.metric("scalellm_generated_tokens_total")
    out = await gw.complete(PROMPT, max_tokens=LONG, stop=[stop])
    assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"
    await _stopped_early(worker, before)


async def test_a_client_disconnect_cancels_the_worker(gateway: GatewayFactory, worker: Service) -> None:
    gw = await gateway(worker.address)
    before = worker.metric("scalellm_generated_tokens_total")
    async with aiohttp.ClientSession() as session:
        response = await session.post(gw.http + "/v1/completions", json=gw.long_stream())
        assert (await response.content.readline()).startswith(b"data: ")
        response.close()  # the client goes away mid-stream
    await _stopped_early(worker, before)


async def test_a_deadline_cancels_the_worker(gateway: GatewayFactory, worker: Service) -> None:
    """The deadline grows until the worker started generating before it ran out (a loaded machine
    may take longer than the first to get the request there): then it must have stopped early."""
    gw = await gateway(worker.address)
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True)
    async with grpc.aio.insecure_channel(gw.grpc) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for timeout_s in (1.0, 3.0, 10.0):
            before = worker.metric("scalellm_generated_tokens_total")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                request_ = gateway_pb2.GatewayGenerateRequest(text=PROMPT, sampling=sampling)
                [m async for m in stub.Generate(request_, timeout=timeout_s)]
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            if await _stopped_early(worker, before) > 0:
                break
        else:
            raise AssertionError("no deadline was long enough for the worker to start the request")


async def test_no_kv_room_moves_to_the_next_worker_and_429_when_none_has_room(
    gateway: GatewayFactory, worker: Service, engine: LLM, tiny_chat_model: Path
) -> None:
    """A decode worker whose blocks are all reserved (by a request whose prefill never answers)
    refuses at once with RESOURCE_EXHAUSTED: the gateway tries the next worker; with no other,
    the client gets 429."""
    small = start_service(
        "services.decode",
        worker_args(tiny_chat_model, "--role", "decode", "--num-kv-blocks", "20", "--prefill-timeout", "600"),
    )
    rng = random.Random(1)
    # 19 blocks of 16; longer than --local-prefill-tokens, so prefix routing asks the prefill worker
    # (and the decode worker reserves its blocks first) instead of prefilling it on the worker.
    prompt = [rng.randrange(3, 49000) for _ in range(300)]
    try:
        async with FakePrefill(Mode.HANG) as hung, grpc.aio.insecure_channel(small.address) as channel:
            occupant = worker_pb2_grpc.DecodeWorkerStub(channel).Generate(
                worker_request("occupant", [7] * 250, 8, [hung.target("hung")])  # 16 of 20 blocks
            )
            await await_until(lambda: len(hung.requests) == 1, "the occupant's blocks are reserved")
            gw = await gateway(small.address, worker.address, prefill_addrs=(f"p={_dead()}",))
            out = await gw.complete(prompt, max_tokens=8)
            want = engine.generate({"prompt_token_ids": prompt}, _sampling(max_tokens=8))[0].outputs[0]
            assert out.choices[0].text == want.text
            assert small.metric('scalellm_requests_total{outcome="no_kv_room"}') == 1
            assert 'scalellm_gateway_route_retries_total{code="RESOURCE_EXHAUSTED"} 1.0' in gw.metrics()

            alone = await gateway(small.address, prefill_addrs=(f"p={_dead()}",))
            with pytest.raises(openai.RateLimitError):
                await alone.complete(prompt, max_tokens=8)
            occupant.cancel()
    finally:
        assert small.stop() == 0, small.log()


async def test_unavailable_moves_on_until_route_attempts_run_out(
    gateway: GatewayFactory, worker: Service, engine: LLM
) -> None:
    """Static workers tie, so they are tried in the order given: two dead ones, then a live one."""
    dead = [f"gone{i}={_dead()}" for i in range(2)]
    want = engine.generate(PROMPT, _sampling(max_tokens=8))[0].outputs[0].text
    three = await gateway(*dead, worker.address, route_attempts=3)
    out = await three.complete(PROMPT, max_tokens=8)
    assert out.choices[0].text == want
    assert 'scalellm_gateway_route_retries_total{code="UNAVAILABLE"} 2.0' in three.metrics()

    served = requests_served(worker)
    two = await gateway(*dead, worker.address, route_attempts=2)
    with pytest.raises(openai.InternalServerError) as err:
        await two.complete(PROMPT, max_tokens=8)
    assert err.value.status_code == 503
    assert requests_served(worker) == served  # the third worker was never asked


async def test_a_worker_dying_mid_stream_ends_streams_with_an_error(
    gateway: GatewayFactory, tiny_chat_model: Path
) -> None:
    """SIGKILL while an SSE stream and a gRPC stream run on it: the SSE stream ends with an error
    event and [DONE], the gRPC stream with UNAVAILABLE."""
    doomed = start_service("services.decode", worker_args(tiny_chat_model, "--role", "both"))
    try:
        gw = await gateway(doomed.address)
        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True)
        async with (
            aiohttp.ClientSession() as session,
            session.post(gw.http + "/v1/completions", json=gw.long_stream()) as response,
            grpc.aio.insecure_channel(gw.grpc) as channel,
        ):
            call = gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GatewayGenerateRequest(text=PROMPT, sampling=sampling)
            )
            assert (await call.read()).token_ids
            first = await response.content.readline()
            assert first.startswith(b"data: ") and "choices" in json.loads(first[6:])
            doomed.kill()
            rest = await asyncio.wait_for(response.read(), 60)  # a hang guard only
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(_drain(call), 60)
        events = parse_events(first + rest)
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        assert events[-2]["error"]["type"] == "service_unavailable"
        assert all("choices" in e for e in events[:-2])
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        doomed.kill()


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_sigterm_drains_the_gateway(worker: Service, engine: LLM, tiny_chat_model: Path) -> None:
    """SIGTERM with a request in flight (held in its prefill): health NOT_SERVING, /health and new
    requests 503, the request in flight still finishes, the process exits 0."""
    async with FakePrefill(Mode.HANG) as hung:
        gw = start_service(
            "services.gateway",
            ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--model", str(tiny_chat_model),
             "--decode-addr", worker.address, "--prefill-addr", f"hung={hung.address}", "--grace-s", "600",
             "--routing", "load"],  # every prompt to the (hung) prefill worker, short ones too
            name="gateway",
        )  # fmt: skip
        http = f"http://{gw.address}"
        assert gw.ready is not None
        grpc_address = gw.ready.fields["grpc"]
        body = {
            "model": tiny_chat_model.name,
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        }
        try:
            async with aiohttp.ClientSession() as session, grpc.aio.insecure_channel(grpc_address) as channel:
                held = asyncio.ensure_future(session.post(http + "/v1/completions", json=body))
                await await_until(lambda: len(hung.requests) == 1, "the request is in flight")
                gw.proc.send_signal(signal.SIGTERM)
                await until_not_serving(channel)
                async with session.get(http + "/health") as resp:
                    assert resp.status == 503 and (await resp.json())["status"] == "draining"
                async with session.post(http + "/v1/completions", json=body) as resp:
                    assert resp.status == 503, await resp.text()
                hung.release.set()  # its prefill fails over to the worker itself
                async with await asyncio.wait_for(held, 60) as resp:
                    assert resp.status == 200
                    out = await resp.json()
            want = engine.generate(PROMPT, _sampling(max_tokens=8))[0].outputs[0].text
            assert out["choices"][0]["text"] == want
            assert await asyncio.to_thread(gw.proc.wait, 60) == 0, gw.log()
        finally:
            gw.kill()


# ---- sampling controls and structured output through the gateway (issue 13) ----------------------

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
    "additionalProperties": False,
}


async def test_sampling_controls_equal_the_engines_on_both_apis(
    gateway: GatewayFactory, worker: Service, engine: LLM
) -> None:
    """logit_bias (forcing and banning), penalties and text bad words: HTTP and gRPC give exactly
    what the engine alone gives with the same SamplingParams; each control changes the answer."""
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2}

    def alone(**kw: Any) -> list[int]:
        return engine.generate(PROMPT, _sampling(max_tokens=8, **kw))[0].outputs[0].token_ids

    first = alone(**penalties)[0]
    second = alone(**penalties, logit_bias={first: -100.0})[0]  # what comes once the first is banned
    word = engine.tokenizer.decode([second]).strip()
    assert (second,) in bad_words_token_ids(engine.tokenizer, [word])  # the word bans exactly it
    controls: dict[str, Any] = {**penalties, "logit_bias": {first: -100.0}, "bad_words": [word]}
    want = alone(**controls)
    assert want[0] not in (first, second) and alone(logit_bias={first: -100.0}, bad_words=[word]) != want

    gw = await gateway(worker.address)
    body = {**controls, "logit_bias": {str(first): -100.0}, "ignore_eos": True}
    out = await gw.complete(PROMPT, max_tokens=8, extra_body=body)
    assert out.choices[0].text == engine.tokenizer.decode(want)
    forced = await gw.complete(
        PROMPT, max_tokens=4, temperature=1.0, extra_body={"logit_bias": {"400": 100}, "ignore_eos": True}
    )
    assert (
        forced.choices[0].text
        == engine.generate(PROMPT, _sampling(max_tokens=4, temperature=1.0, logit_bias={400: 100}))[0]
        .outputs[0]
        .text
        == engine.tokenizer.decode([400] * 4)
    )
    async with grpc.aio.insecure_channel(gw.grpc) as channel:
        sampling = common_pb2.SamplingParams(
            max_tokens=8, ignore_eos=True, logit_bias={first: -100.0}, **penalties
        )
        request = gateway_pb2.GatewayGenerateRequest(text=PROMPT, sampling=sampling, bad_words=[word])
        messages = [m async for m in gateway_pb2_grpc.GatewayStub(channel).Generate(request)]
    assert [t for m in messages for t in m.token_ids] == want


async def test_allowed_token_ids_on_both_apis(gateway: GatewayFactory, worker: Service, engine: LLM) -> None:
    """vLLM's allowed_token_ids: every generated token is one of them, exactly the engine's
    tokens, over HTTP (both APIs) and gRPC."""
    allowed = [400, 401, 402, 403]
    sampled = _sampling(max_tokens=8, temperature=1.0, seed=5, allowed_token_ids=allowed)
    want = engine.generate(PROMPT, sampled)[0].outputs[0].token_ids
    assert set(want) <= set(allowed) and len(want) == 8
    gw = await gateway(worker.address)
    extra = {"allowed_token_ids": allowed, "ignore_eos": True}
    out = await gw.complete(PROMPT, max_tokens=8, temperature=1.0, seed=5, extra_body=extra)
    assert out.choices[0].text == engine.tokenizer.decode(want)
    chat = await gw.client.chat.completions.create(
        model=gw.model, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0.0,
        logprobs=True, extra_body={**extra, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    ids = [int(t.token.removeprefix("token_id:")) for t in chat.choices[0].logprobs.content]
    assert len(ids) == 6 and set(ids) <= set(allowed), ids
    async with grpc.aio.insecure_channel(gw.grpc) as channel:
        request = gateway_pb2.GatewayGenerateRequest(text=PROMPT, sampling=sampling_to_proto(sampled))
        messages = [m async for m in gateway_pb2_grpc.GatewayStub(channel).Generate(request)]
    assert [t for m in messages for t in m.token_ids] == want


async def test_response_format_json_schema_validates(gateway: GatewayFactory, worker: Service) -> None:
    gw = await gateway(worker.address)
    response_format = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
    for seed in (1, 2):
        out = await gw.client.chat.completions.create(
            model=gw.model, messages=[{"role": "user", "content": "An item, please."}], max_tokens=60,
            temperature=1.0, seed=seed, response_format=response_format,  # type: ignore[arg-type]
        )  # fmt: skip
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content or ""), SCHEMA)


async def test_vllms_structured_outputs_choice_and_grammar(gateway: GatewayFactory, worker: Service) -> None:
    """What clients written for vLLM send (extra_body structured_outputs, and the older guided_*):
    a choice is exactly one of its strings, a GBNF grammar is followed; a grammar the engine cannot
    compile is a 400 that names the client's field."""
    gw = await gateway(worker.address)
    options = ["positive", "negative", "neutral"]
    gbnf = 'root ::= ("yes" | "no") " " [0-9] [0-9]'
    bodies: list[dict[str, Any]] = [
        {"structured_outputs": {"choice": options}},
        {"guided_choice": options},
        {"structured_outputs": {"grammar": gbnf}},
        {"guided_grammar": gbnf},
    ]
    answers = await asyncio.gather(
        *(
            gw.client.chat.completions.create(
                model=gw.model, messages=[{"role": "user", "content": "How was the film?"}], max_tokens=20,
                temperature=1.0, seed=seed, extra_body=body,
            )
            for body in bodies
            for seed in (1, 2)
        )
    )  # fmt: skip
    texts = [a.choices[0].message.content or "" for a in answers]
    assert all(t in options for t in texts[:4]), texts
    assert all(re.fullmatch(r"(yes|no) [0-9][0-9]", t) for t in texts[4:]), texts
    assert all(a.choices[0].finish_reason == "stop" for a in answers)
    async with aiohttp.ClientSession() as session:
        payload = {
            "model": gw.model,
            "prompt": PROMPT,
            "max_tokens": 4,
            "structured_outputs": {"grammar": "root ::= ("},
        }
        async with session.post(gw.http + "/v1/completions", json=payload) as r:
            error = (await r.json())["error"]
            assert (
                r.status == 400 and "structured_output" in error["message"] and "GBNF" in error["message"]
            ), error


async def test_a_cache_salt_shares_cached_prompts_only_with_the_same_salt(
    gateway: GatewayFactory, worker: Service
) -> None:
    """vLLM's cache_salt through a real worker: the same long prompt is a prefix-cache hit only
    for a request with the salt it was cached under (usage.prompt_tokens_details.cached_tokens),
    over HTTP and gRPC alike."""
    gw = await gateway(worker.address)
    prompt = " ".join(f"item{i}" for i in range(120))  # far more than one block of tokens

    async def cached(salt: str | None) -> int:
        extra = {} if salt is None else {"cache_salt": salt}
        out = await gw.client.completions.create(
            model=gw.model, prompt=prompt, max_tokens=1, extra_body=extra
        )
        assert out.usage is not None and out.usage.prompt_tokens_details is not None
        return out.usage.prompt_tokens_details.cached_tokens or 0

    assert await cached("alice") == 0
    assert await cached("bob") == 0 and await cached(None) == 0
    assert await cached("alice") > 0 and await cached(None) > 0
    async with grpc.aio.insecure_channel(gw.grpc) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for salt, hit in (("carol", False), ("carol", True), ("alice", True)):
            sampling = common_pb2.SamplingParams(max_tokens=1, cache_salt=salt)
            messages = [
                m
                async for m in stub.Generate(
                    gateway_pb2.GatewayGenerateRequest(text=prompt, sampling=sampling)
                )
            ]
            assert (messages[-1].usage.cached_prompt_tokens > 0) is hit, salt


async def test_continuous_usage_stats_put_usage_on_every_chunk(
    gateway: GatewayFactory, worker: Service
) -> None:
    """What vLLM's benchmark client sends: usage so far on every chunk, then a last usage chunk.
    With logprobs each chunk lists its new tokens, so the counts are checked exactly."""
    gw = await gateway(worker.address)
    for logprobs in (None, 0):
        body = {
            "model": gw.model, "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, "stream": True,
            "logprobs": logprobs, "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }  # fmt: skip
        async with (
            aiohttp.ClientSession() as session,
            session.post(gw.http + "/v1/completions", json=body) as r,
        ):
            assert r.status == 200, await r.text()
            events = parse_events(await r.read())
        assert events[-1] == "[DONE]"
        chunks, last = events[:-2], events[-2]
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 12 and len(chunks) > 1
        if logprobs is not None:
            seen = [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks]
            assert counts == list(itertools.accumulate(seen))
        prompt = last["usage"]["prompt_tokens"]
        assert all(c["usage"]["prompt_tokens"] == prompt for c in chunks)
        assert all(c["usage"]["total_tokens"] == prompt + n for c, n in zip(chunks, counts, strict=True))


async def test_values_the_worker_refuses_are_named(gateway: GatewayFactory, worker: Service) -> None:
    """Out of range (SamplingParams), outside the vocabulary (the gateway's check after parsing)
    and uncompilable (the worker's grammar engine): 400 and INVALID_ARGUMENT naming the field as
    the client named it, in the message and in the error's param."""
    gw = await gateway(worker.address)
    chat = [{"role": "user", "content": "hi"}]
    broken = {"type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}  # its regex
    tool = {"type": "function", "function": {"name": "f", "parameters": broken}}
    async with aiohttp.ClientSession() as session:
        for path, body, name in (
            ("/v1/completions", {"logit_bias": {"5": 200}}, "logit_bias"),
            ("/v1/completions", {"guided_regex": "(unclosed"}, "guided_regex"),
            ("/v1/completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
            ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "string", "pattern": "(unclosed"}}}}, "response_format"),
            ("/v1/chat/completions", {"tools": [tool], "tool_choice": "required"}, "tool_choice"),
        ):  # fmt: skip
            prompt = {"messages": chat} if "chat" in path else {"prompt": PROMPT}
            payload = {"model": gw.model, "max_tokens": 4, **prompt, **body}
            async with session.post(gw.http + path, json=payload) as r:
                error = (await r.json())["error"]
                assert r.status == 400 and error["param"] == name and f"'{name}'" in error["message"], error
    async with grpc.aio.insecure_channel(gw.grpc) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for sampling, name in (
            (common_pb2.SamplingParams(logit_bias={5: 200.0}), "sampling.logit_bias"),
            (common_pb2.SamplingParams(logit_bias={10**6: 1.0}), "sampling.logit_bias"),
            (
                common_pb2.SamplingParams(structured_output=common_pb2.StructuredOutput(regex="(")),
                "sampling.structured_output",
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _drain(
                    stub.Generate(gateway_pb2.GatewayGenerateRequest(text=PROMPT, sampling=sampling))
                )
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and name in (
                err.value.details() or ""
            )


def _colocated_worker(model: Path, *flags: str) -> Iterator[Service]:
    svc = start_service("services.decode", worker_args(model, "--role", "both", *flags))
    yield svc
    assert svc.stop() == 0, svc.log()


@pytest.fixture(scope="module")
def async_worker(tiny_chat_model: Path) -> Iterator[Service]:
    yield from _colocated_worker(tiny_chat_model, "--async-scheduling", "on")


async def test_an_async_scheduling_worker_answers_as_the_engine_alone(
    gateway: GatewayFactory, async_worker: Service, engine: LLM
) -> None:
    """A worker run with --async-scheduling on, its steps overlapping: concurrent requests of every
    kind (greedy, seeded draws with logprobs, penalties with a bad word, a regex and a JSON schema)
    batched together give exactly what the synchronous engine alone gives each of them."""
    regex = r"(yes|no) [0-9]{2,4}"
    cases: list[tuple[dict[str, Any], SamplingParams]] = [
        ({"max_tokens": 12, "extra_body": {"ignore_eos": True}}, _sampling(max_tokens=12)),
        (
            {"max_tokens": 10, "temperature": 1.0, "seed": 5, "logprobs": 2, "extra_body": {"ignore_eos": True}},
            _sampling(max_tokens=10, temperature=1.0, seed=5, logprobs=2),
        ),
        (
            {"max_tokens": 10, "presence_penalty": 0.5, "extra_body": {"ignore_eos": True, "bad_words": ["the"]}},
            _sampling(max_tokens=10, presence_penalty=0.5, bad_words=["the"]),
        ),
        (
            {"max_tokens": 12, "temperature": 1.0, "seed": 3, "extra_body": {"guided_regex": regex}},
            SamplingParams(temperature=1.0, seed=3, max_tokens=12, structured_output=StructuredOutput.regex(regex)),
        ),
        (
            {"max_tokens": 40, "extra_body": {"guided_json": SCHEMA}},
            SamplingParams(temperature=0.0, max_tokens=40, structured_output=StructuredOutput.json_schema(SCHEMA)),
        ),
    ]  # fmt: skip
    gw = await gateway(async_worker.address)
    answers = await asyncio.gather(
        *(gw.client.completions.create(model=gw.model, prompt=PROMPT, **{"temperature": 0, **kw}) for kw, _ in cases)
    )  # fmt: skip
    for answer, (kw, params) in zip(answers, cases, strict=True):
        alone = engine.generate(PROMPT, params)[0].outputs[0]
        assert answer.choices[0].text == alone.text, kw
        if params.logprobs is not None:
            got = answer.choices[0].logprobs.token_logprobs
            assert got == pytest.approx([lp.logprob for lp in alone.logprobs or ()], abs=1e-4)
    assert re.fullmatch(regex, answers[3].choices[0].text)
    jsonschema.validate(json.loads(answers[4].choices[0].text), SCHEMA)


@pytest.fixture(scope="module")
def speculative_worker(tiny_chat_model: Path) -> Iterator[Service]:
    yield from _colocated_worker(tiny_chat_model, "--num-speculative-tokens", "4")


async def test_a_speculative_worker_answers_as_the_engine_alone(
    gateway: GatewayFactory, speculative_worker: Service, engine: LLM
) -> None:
    """A worker drafting by prompt lookup (--num-speculative-tokens 4): greedy answers streamed
    several tokens a step, beside a seeded one with logprobs, are exactly the engine's; the
    worker's metrics show drafts accepted (so the drafts were verified, not skipped)."""
    repeating = "one two three four five six seven eight. one two three four five six seven eight. one two"
    gw = await gateway(speculative_worker.address)
    greedy = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    seeded = {
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 5,
        "logprobs": 2,
        "extra_body": {"ignore_eos": True},
    }
    stream = await gw.client.completions.create(model=gw.model, prompt=repeating, stream=True, **greedy)
    streamed = "".join([c.choices[0].text async for c in stream if c.choices])
    answers = await asyncio.gather(
        gw.client.completions.create(model=gw.model, prompt=PROMPT, **greedy),
        gw.client.completions.create(model=gw.model, prompt=PROMPT, **seeded),
    )
    assert streamed == engine.generate(repeating, _sampling(max_tokens=24))[0].outputs[0].text
    assert answers[0].choices[0].text == engine.generate(PROMPT, _sampling(max_tokens=24))[0].outputs[0].text
    alone = engine.generate(PROMPT, _sampling(max_tokens=10, temperature=1.0, seed=5, logprobs=2))[0].outputs[
        0
    ]
    assert answers[1].choices[0].text == alone.text
    got = answers[1].choices[0].logprobs.token_logprobs
    assert got == pytest.approx([lp.logprob for lp in alone.logprobs or ()], abs=1e-4)
    port = speculative_worker.proc.args[speculative_worker.proc.args.index("--metrics-port") + 1]  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    accepted = re.search(r"^scalellm_spec_decode_accepted_tokens_total (\S+)$", text, re.M)
    drafted = re.search(r"^scalellm_spec_decode_draft_tokens_total (\S+)$", text, re.M)
    assert accepted and drafted and 0 < float(accepted[1]) <= float(drafted[1]), text[-2000:]
