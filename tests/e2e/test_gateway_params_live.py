"""Tools, echo / prompt logprobs, /tokenize and priority end to end: the official openai client
through an in-process gateway over real workers on the demo model, colocated (one BOTH worker)
and disaggregated (a prefill and a decode worker). Greedy throughout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest

from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayServer
from tests.procs import Service, start_service
from tests.service.worker_calls import wait_all_blocks_free, worker_args

pytestmark = pytest.mark.slow

PREFILL_ID = "prefill-params"
PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {  # closed, as PARAMS: an open object lets a tiny model nest keys until max_tokens
    "type": "object",
    "properties": {"tz": {"type": "string", "maxLength": 8}},
    "additionalProperties": False,
}
TOOLS: Any = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast", "parameters": PARAMS},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def workers(demo_model_dir: Path) -> Iterator[dict[str, Service]]:
    started = {
        "prefill": start_service("services.prefill", worker_args(demo_model_dir, "--worker-id", PREFILL_ID)),
        "decode": start_service("services.decode", worker_args(demo_model_dir, "--role", "decode")),
        "both": start_service("services.decode", worker_args(demo_model_dir, "--role", "both")),
    }
    yield started
    for svc in started.values():
        assert svc.stop() == 0, svc.log()


@pytest.fixture(params=["colocated", "disaggregated"])
async def gateway(
    request: pytest.FixtureRequest, demo_model_dir: Path, workers: dict[str, Service]
) -> AsyncIterator[tuple[str, openai.AsyncOpenAI, Service]]:
    if request.param == "colocated":
        decode, routes = workers["both"], {"decode_addrs": (workers["both"].address,)}
    else:
        decode = workers["decode"]
        routes = {
            "decode_addrs": (decode.address,),
            "prefill_addrs": (f"{PREFILL_ID}={workers['prefill'].address}",),
        }
    config = GatewayConfig(host="127.0.0.1", http_port=0, grpc_port=0, model=str(demo_model_dir), **routes)  # type: ignore[arg-type]
    server = GatewayServer(config)
    await server.start()
    url = f"http://127.0.0.1:{server.http_port}"
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        yield url, client, decode
    await server.stop(0)
    await wait_all_blocks_free(decode)


async def test_required_and_named_tool_calls_validate(
    gateway: tuple[str, openai.AsyncOpenAI, Service],
) -> None:
    _, client, _ = gateway
    out = await client.chat.completions.create(
        model="", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=80,
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)

    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    stream = await client.chat.completions.create(
        model="", messages=ASK, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=80, stream=True
    )
    chunks = [c async for c in stream]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas if d.function)), PARAMS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_auto_and_tool_history_are_served(gateway: tuple[str, openai.AsyncOpenAI, Service]) -> None:
    _, client, _ = gateway
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"},
    ]  # fmt: skip
    out = await client.chat.completions.create(
        model="", messages=history, tools=TOOLS, temperature=0, max_tokens=12
    )
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls


async def test_echo_scores_the_prompt_like_the_engine(
    gateway: tuple[str, openai.AsyncOpenAI, Service], demo_model_dir: Path
) -> None:
    from scalellm import LLM, SamplingParams

    url, client, _ = gateway
    text = "The capital of France is Paris"
    out = await client.completions.create(
        model="", prompt=text, echo=True, max_tokens=0, logprobs=1, extra_headers={"x-scalellm-timings": "1"}
    )
    choice = out.choices[0]
    assert choice.text == text and choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/tokenize", json={"prompt": text}) as r,
    ):
        ids = (await r.json())["tokens"]
    llm = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=64)
    want = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    assert want.prompt_logprobs is not None and choice.logprobs.token_logprobs[0] is None
    got = choice.logprobs.token_logprobs[1:]
    assert got == pytest.approx([lp.logprob for lp in want.prompt_logprobs[1:] if lp is not None], abs=1e-3)
    # computed where the prompt ran: the decode worker prefilled it itself (no KV came over)
    assert (choice.model_extra or {})["timings"]["transfer_bytes"] == 0
    plain = await client.completions.create(
        model="", prompt=text, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 0}
    )
    table = (plain.choices[0].model_extra or {})["prompt_logprobs"]
    assert table[0] is None and [int(next(iter(t))) for t in table[1:]] == ids[1:]


async def test_tokenize_detokenize_and_priority(gateway: tuple[str, openai.AsyncOpenAI, Service]) -> None:
    url, client, _ = gateway
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/tokenize", json={"messages": ASK}) as r:
            tokens = (await r.json())["tokens"]
        async with session.post(url + "/detokenize", json={"tokens": tokens}) as r:
            assert (await r.json())["prompt"].endswith("<|im_start|>assistant\n")
    out = await client.chat.completions.create(
        model="", messages=ASK, max_tokens=2, temperature=0, extra_body={"priority": -3}
    )
    assert out.usage is not None and out.usage.prompt_tokens == len(tokens)
