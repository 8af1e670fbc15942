"""Bad inputs, API keys, limits, overload, retries and disconnects against the in-process gateway.

Every bad request gets a 4xx with OpenAI's error body naming the field, no worker is touched, and
the gateway keeps serving afterwards. (Fixtures and the scripted worker: test_gateway_server.py.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest

from scalellm.v1 import gateway_pb2, gateway_pb2_grpc
from tests.unit.test_gateway_server import (
    DEADLINES_S,
    REPLY,
    Mesh,
    MeshFactory,
    wait_for,
)

M = [{"role": "user", "content": "hi"}]
ALPHA = {"Authorization": "Bearer sk-alpha"}
C = "/v1/completions"
CHAT = "/v1/chat/completions"

BAD: list[tuple[str, Any, str | None]] = [
    (C, b"{not json", None),
    (C, b"[1, 2]", None),
    (C, b'{"prompt": "x", "temperature": NaN}', None),
    (C, {}, "prompt"),
    (C, {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": True}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    (C, {"prompt": "x", "top_p": 0}, "top_p"),
    (C, {"prompt": "x", "top_p": 1.5}, "top_p"),
    (C, {"prompt": "x", "temperature": -1}, "temperature"),
    (C, b'{"prompt": "x", "temperature": 1e999}', "temperature"),
    (C, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (C, {"prompt": "x", "top_k": -2}, "top_k"),
    (C, {"prompt": "x", "seed": -1}, "seed"),
    (C, {"prompt": "x", "n": 0}, "n"),
    (C, {"prompt": "x", "n": 17}, "n"),
    (C, {"prompt": ["a", "b"], "n": 9}, "n"),
    (C, {"prompt": "x", "stop": [f"s{i}" for i in range(9)]}, "stop"),
    (C, {"prompt": "x", "stop": [""]}, "stop"),
    (C, {"prompt": "x", "stop": 5}, "stop"),
    (C, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (C, {"prompt": "x", "echo": "yes"}, "echo"),
    (C, {"prompt": "x", "max_tokens": 0, "logprobs": 1}, "max_tokens"),  # 0 only with echo
    (C, {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    (C, {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs"),
    (C, {"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
    (CHAT, {"messages": M, "prompt_logprobs": 1}, "prompt_logprobs"),  # completions only
    (CHAT, {"messages": M, "echo": "yes"}, "echo"),
    (CHAT, {"messages": M, "best_of": 2}, "best_of"),
    (CHAT, {"messages": M, "use_beam_search": True}, "use_beam_search"),
    (C, {"prompt": "x", "length_penalty": 0.5}, "length_penalty"),
    (C, {"prompt": "x", "spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    (C, {"prompt": "x", "request_id": "has space"}, "request_id"),
    (C, {"prompt": "x", "request_id": "x" * 129}, "request_id"),
    (CHAT, {"messages": M, "request_id": 5}, "request_id"),
    (C, {"prompt": "x", "return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
    (C, {"prompt": "x", "suffix": "y"}, "suffix"),
    (C, {"prompt": "x", "best_of": 2}, "best_of"),
    (C, {"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
    (C, {"prompt": "x", "presence_penalty": "1"}, "presence_penalty"),
    (C, {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    (C, {"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"a": 5}}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": [5]}, "logit_bias"),
    (C, {"prompt": "x", "logit_bias": {"999999": 5}}, "logit_bias"),  # beyond the vocabulary
    (C, {"prompt": "x", "min_tokens": -1}, "min_tokens"),
    (C, {"prompt": "x", "min_tokens": 20}, "min_tokens"),  # more than the default max_tokens 16
    (C, {"prompt": "x", "bad_words": [""]}, "bad_words"),
    (C, {"prompt": "x", "stop_token_ids": [999_999]}, "stop_token_ids"),
    (C, {"prompt": "x", "allowed_token_ids": [999_999]}, "allowed_token_ids"),
    (C, {"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
    (CHAT, {"messages": M, "allowed_token_ids": [-3]}, "allowed_token_ids"),
    (CHAT, {"messages": M, "allowed_token_ids": "1,2"}, "allowed_token_ids"),
    (C, {"prompt": "x", "response_format": {"type": "xml"}}, "response_format.type"),
    (C, {"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        C,
        {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
        "response_format.json_schema.schema",
    ),
    (C, {"prompt": "x", "response_format": {"type": "json_object"}, "ignore_eos": True}, "response_format"),
    (C, {"prompt": "x", "guided_json": {}, "guided_regex": "a+"}, "guided_regex"),
    (C, {"prompt": "x", "guided_regex": 5}, "guided_regex"),
    (
        C,
        {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
        "stream_options.continuous_usage_stats",
    ),
    (C, {"prompt": "x", "max_tokenz": 5}, "max_tokenz"),
    (C, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (C, {"prompt": "x", "stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    (C, {"prompt": "x", "stream": "yes"}, "stream"),
    (C, {"prompt": []}, "prompt"),
    (C, {"prompt": [1, "a"]}, "prompt"),
    (C, {"prompt": [-1]}, "prompt"),
    (C, {"prompt": [999_999]}, "prompt"),
    (C, {"prompt": ""}, "prompt"),
    (C, {"prompt": "word " * 200}, "prompt"),
    (C, {"prompt": 42}, "prompt"),
    (C, {"model": 5, "prompt": "x"}, "model"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": ["hi"]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": "tool", "content": "x", "tool_call_id": 1}]}, "messages[0].tool_call_id"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "foo": 1}]}, "messages[0].foo"),
    (
        CHAT,
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]},
        "messages[0].tool_calls[0].function",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0].type",
    ),
    (
        CHAT,
        {"messages": M, "tools": [{"type": "function", "function": {"name": "f g"}}]},
        "tools[0].function.name",
    ),
    (CHAT, {"messages": M, "functions": [{"name": "f"}]}, "functions"),
    (CHAT, {"messages": M, "tool_choice": "auto"}, "tool_choice"),
    (CHAT, {"messages": M, "response_format": {"type": "json_object", "x": 1}}, "response_format.x"),
    (CHAT, {"messages": M, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    (
        CHAT,
        {"messages": M, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": 1},
        "tool_choice",
    ),
    (CHAT, {"messages": M, "priority": 2**31}, "priority"),
    (C, {"prompt": "x", "priority": "high"}, "priority"),
    (CHAT, {"messages": M, "metadata": {"team": 1}}, "metadata"),
    (CHAT, {"messages": M, "store": "yes"}, "store"),
    (CHAT, {"messages": M, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": M, "logprobs": "yes"}, "logprobs"),
    (CHAT, {"messages": M, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    (CHAT, {"messages": M, "n": 2.5}, "n"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 200}]}, "messages"),
]


async def post(mesh: Mesh, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession() as session,
        session.post(mesh.http + path, data=data, headers=headers) as r,
    ):
        return r.status, await r.json()


@pytest.fixture
async def limited(mesh_factory: MeshFactory) -> Mesh:
    return await mesh_factory(max_prompt_tokens=64, max_n=16, max_stop_strings=8, max_payload_bytes=64 * 1024)


async def test_bad_inputs_are_rejected_by_name(limited: Mesh) -> None:
    for path, body, param in BAD:
        status, error = await post(limited, path, body)
        assert status == 400, (body, status, error)
        assert set(error["error"]) == {"message", "type", "param", "code"}, error
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
        assert error["error"]["param"] == param, (body, error)
        if param:
            assert param.split(".")[-1].split("[")[0] in error["error"]["message"], error
    assert limited.workers[0].requests == []  # no worker was touched
    status, ok = await post(limited, C, {"prompt": "x", "max_tokens": 3})
    assert status == 200 and ok["choices"][0]["text"] == "Hello! The"


async def test_noop_values_of_unsupported_fields_are_accepted(limited: Mesh) -> None:
    body = {
        "messages": M, "max_tokens": 2, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "user": "u-1",
        "stream": False, "top_k": -1, "min_p": 0.1, "ignore_eos": False, "stop": None, "seed": None,
        "store": True, "metadata": {"team": "search"}, "service_tier": "flex",  # informative only
        "best_of": 1, "use_beam_search": False, "length_penalty": 1.0, "spaces_between_special_tokens": True,
    }  # fmt: skip
    status, out = await post(limited, CHAT, body)
    assert status == 200, out
    assert out["choices"][0]["message"]["content"] == "Hello!"


async def test_langchains_vllm_defaults_are_accepted(limited: Mesh) -> None:
    """What LangChain's vLLM chat class sends on every request (its _extra_body at defaults)."""
    body = {
        "messages": M, "max_tokens": 2, "best_of": 1, "use_beam_search": False, "top_k": -1, "min_p": 0.0,
        "repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": False, "stop_token_ids": [],
        "ignore_eos": False, "min_tokens": 0, "skip_special_tokens": True, "spaces_between_special_tokens": True,
        "include_stop_str_in_output": False, "guided_json": None, "guided_regex": None, "guided_choice": None,
        "guided_grammar": None, "guided_decoding_backend": None, "guided_whitespace_pattern": None, "echo": False,
    }  # fmt: skip
    status, out = await post(limited, CHAT, body)
    assert status == 200, out
    status, out = await post(limited, CHAT, {**body, "guided_decoding_backend": "xgrammar"})
    assert status == 200, out
    for name, value in (("early_stopping", True), ("guided_whitespace_pattern", "[ ]?")):
        status, out = await post(limited, CHAT, {**body, name: value})
        assert status == 400 and out["error"]["param"] == name, out


async def test_huge_payload_is_413(limited: Mesh) -> None:
    status, error = await post(limited, C, {"prompt": "x" * 100_000})
    assert status == 413 and "larger than the limit" in error["error"]["message"]
    status, _ = await post(limited, C, {"prompt": "x", "max_tokens": 1})
    assert status == 200


async def test_wrong_method_and_path(limited: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(limited.http + C) as r:
            assert r.status == 405 and (await r.json())["error"]["type"] == "invalid_request_error"
        async with session.post(limited.http + "/v1/embeddings", json={}) as r:
            assert r.status == 404 and "error" in await r.json()


async def test_api_keys(mesh_factory: MeshFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# key tenant\nsk-alpha team-a\nsk-beta team-b\n")
    keys.chmod(0o600)
    mesh = await mesh_factory(api_keys_file=str(keys))
    with pytest.raises(openai.AuthenticationError) as info:
        await mesh.client("sk-wrong").completions.create(model="SmolLM2-135M-Instruct", prompt="x")
    assert info.value.body["code"] == "invalid_api_key"
    ok = await mesh.client("sk-beta").completions.create(
        model="SmolLM2-135M-Instruct", prompt="x", max_tokens=1
    )
    assert ok.choices[0].text == "Hello"
    assert [m.id for m in (await mesh.client("sk-alpha").models.list()).data] == ["SmolLM2-135M-Instruct"]
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/models", "/metrics"):
            async with session.get(mesh.http + path) as r:
                assert r.status == 401, path
        async with session.get(mesh.http + "/health") as r:
            assert r.status == 200
        async with session.get(mesh.http + "/metrics", headers={"Authorization": "Bearer sk-alpha"}) as r:
            assert r.status == 200
    async with aiohttp.ClientSession() as session:
        card = mesh.http + "/v1/models/SmolLM2-135M-Instruct"
        for headers, status in (({}, 401), ({"Authorization": "Bearer sk-x"}, 401), (ALPHA, 200)):
            async with session.get(card, headers=headers) as r:
                assert r.status == status, (headers, r.status)
        for path in (C, CHAT):  # no key at all: refused before anything is parsed or routed
            async with session.post(mesh.http + path, json={"prompt": "x", "messages": M}) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    assert len(mesh.workers[0].requests) == 1
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListModels(gateway_pb2.ListModelsRequest())
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        tokenize = gateway_pb2.TokenizeRequest(text="Hello")
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Tokenize(tokenize, metadata=metadata)
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.Tokenize(tokenize, metadata=[("authorization", "Bearer sk-alpha")])).token_ids
        request = gateway_pb2.GatewayGenerateRequest(text="x")
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in stub.Generate(request, metadata=metadata)]
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        messages = [m async for m in stub.Generate(request, metadata=[("authorization", "Bearer sk-alpha")])]
        assert "".join(m.text for m in messages) == REPLY
    assert len(mesh.workers[0].requests) == 2  # only the two requests with a good key reached it


async def test_inflight_bound_gives_429(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(max_inflight=1, worker_kw=[{"hold_after": 1}])
    client = mesh.client()
    first = await client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="x", max_tokens=10, stream=True
    )
    with pytest.raises(openai.RateLimitError):
        await client.completions.create(model="SmolLM2-135M-Instruct", prompt="x")
    mesh.workers[0].release.set()
    assert "".join([c.choices[0].text async for c in first]).startswith("Hello!")
    ok = await client.completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=1)
    assert ok.choices[0].text == "Hello"


async def test_resource_exhausted_moves_to_the_next_worker(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(workers=2, worker_kw=[{"exhausted": True}, {}])
    out = await mesh.client().completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=2)
    assert out.choices[0].text == "Hello!"
    assert len(mesh.workers[0].requests) == 1 and len(mesh.workers[1].requests) == 1
    assert mesh.gateway.core.router.inflight("w0") == 0 and mesh.gateway.core.router.inflight("w1") == 0


async def test_all_workers_exhausted_is_429(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(workers=2, worker_kw=[{"exhausted": True}, {"exhausted": True}])
    with pytest.raises(openai.RateLimitError) as info:
        await mesh.client().completions.create(model="SmolLM2-135M-Instruct", prompt="x")
    assert "KV" in info.value.message


async def test_unreachable_worker_is_503(mesh_factory: MeshFactory) -> None:
    from scalellm.redis_server import free_port

    mesh = await mesh_factory(workers=0, decode_addrs=(f"127.0.0.1:{free_port()}",), request_timeout_s=5.0)
    with pytest.raises(openai.InternalServerError) as info:
        await mesh.client().completions.create(model="SmolLM2-135M-Instruct", prompt="x")
    assert info.value.status_code == 503


async def test_stream_disconnect_cancels_the_decode_stream(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(worker_kw=[{"hold_after": 1}])
    async with aiohttp.ClientSession() as session:
        resp = await session.post(mesh.http + C, json={"prompt": "x", "max_tokens": 50, "stream": True})
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()  # the client goes away mid-stream
    await wait_for(lambda: len(mesh.workers[0].cancelled) == 1)
    await wait_for(lambda: mesh.gateway.core.in_flight == 0)
    assert mesh.workers[0].completed == [] and mesh.gateway.core.router.inflight("w0") == 0


async def test_non_streaming_disconnect_cancels_the_decode_stream(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(worker_kw=[{"hold_after": 1}])
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(session.post(mesh.http + C, json={"prompt": "x", "max_tokens": 50}))
        await wait_for(lambda: mesh.workers[0].sent == 1)  # the gateway is collecting the answer
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await wait_for(lambda: len(mesh.workers[0].cancelled) == 1)
    await wait_for(lambda: mesh.gateway.core.in_flight == 0)


async def test_deadline_cancels_the_decode_stream(mesh_factory: MeshFactory) -> None:
    for timeout_s in DEADLINES_S:
        mesh = await mesh_factory(worker_kw=[{"hold_after": 1}], request_timeout_s=timeout_s)
        status, error = await post(mesh, C, {"prompt": "x", "max_tokens": 50})
        assert status == 504 and error["error"]["type"] == "timeout_error"
        await wait_for(lambda: mesh.gateway.core.in_flight == 0)  # noqa: B023 - awaited in this iteration
        if mesh.workers[0].requests:
            break
    else:
        raise AssertionError("no deadline was long enough for the request to reach the worker")
    await wait_for(lambda: len(mesh.workers[0].cancelled) == 1)  # held after 1 token: only a cancel ends it
