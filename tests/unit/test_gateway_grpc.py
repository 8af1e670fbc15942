"""The gRPC Gateway service as a streaming client sees it (scripted workers: test_gateway_server.py)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from scalellm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.unit.test_gateway_server import (
    DEADLINES_S,
    REPLY,
    Mesh,
    MeshFactory,
    ScriptedDecode,
    tokens_until,
    wait_for,
)

Request = gateway_pb2.GatewayGenerateRequest


async def generate(mesh: Mesh, request: Request, **kw: object) -> list[gateway_pb2.GatewayGenerateResponse]:
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
        return [m async for m in gateway_pb2_grpc.GatewayStub(channel).Generate(request, **kw)]


async def test_generate_streams_text_ids_usage_and_timings(mesh: Mesh) -> None:
    messages = await generate(
        mesh, Request(text="Say hi", sampling=common_pb2.SamplingParams(max_tokens=100))
    )
    assert "".join(m.text for m in messages) == REPLY
    assert all("\ufffd" not in m.text for m in messages)  # 😀 spans two tokens: never half a character
    assert [t for m in messages for t in m.token_ids] == [*mesh.reply_ids, 2]
    assert len({m.request_id for m in messages}) == 1 and messages[0].request_id
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and all(
        m.finish_reason == 0 for m in messages[:-1]
    )
    assert last.usage.completion_tokens == len(mesh.reply_ids) + 1 and last.usage.prompt_tokens > 0
    assert last.timings.gateway > 0 and last.timings.decode == pytest.approx(0.003)
    assert 0 < last.timings.worker_call < last.timings.total
    sent = mesh.workers[0].requests[0]
    assert sent.sampling.temperature == 0 and sent.sampling.max_tokens == 100  # unset temperature: greedy


async def test_generate_chat_n_and_stop(mesh: Mesh) -> None:
    mesh.workers[0].hold_after = tokens_until(mesh, "😀")  # the rest only comes if nobody cancels
    chat = gateway_pb2.ChatMessages(messages=[gateway_pb2.ChatMessage(role="user", content="hi")])
    messages = await generate(mesh, Request(chat=chat, n=2, stop=["😀"]))
    texts = {0: "", 1: ""}
    for m in messages:
        texts[m.index] += m.text
    assert texts == {0: "Hello! The café costs 5€. ", 1: "Hello! The café costs 5€. "}
    finals = [m for m in messages if m.finish_reason]
    assert sorted(m.index for m in finals) == [0, 1] and all(m.stop_str == "😀" for m in finals)
    await wait_for(lambda: len(mesh.workers[0].cancelled) == 2)


async def test_generate_token_ids_and_logprobs(mesh: Mesh) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=3, logprobs=2)
    messages = await generate(mesh, Request(token_ids=gateway_pb2.TokenIds(ids=[1, 2, 3]), sampling=sampling))
    assert list(mesh.workers[0].requests[0].prompt_token_ids) == [1, 2, 3]
    logprobs = [lp for m in messages for lp in m.logprobs]
    assert len(logprobs) == 3 and all(len(lp.top) == 2 for lp in logprobs)
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_generate_prompt_logprobs(mesh: Mesh) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=3, prompt_logprobs=1)
    messages = await generate(mesh, Request(token_ids=gateway_pb2.TokenIds(ids=[5, 6, 7]), sampling=sampling))
    assert mesh.workers[0].requests[0].sampling.prompt_logprobs == 1
    assert [(lp.token_id, [t.token_id for t in lp.top]) for lp in messages[0].prompt_logprobs] == [
        (6, [7]),
        (7, [8]),
    ]
    assert all(not m.prompt_logprobs for m in messages[1:])


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (Request(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (Request(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (Request(text="x", sampling=common_pb2.SamplingParams(temperature=101)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (Request(text="x", sampling=common_pb2.SamplingParams(top_p=2)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (Request(text="x", sampling=common_pb2.SamplingParams(top_k=-3)), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (Request(text="x", sampling=common_pb2.SamplingParams(logprobs=21)), grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
        (Request(text="x", sampling=common_pb2.SamplingParams(prompt_logprobs=21)), grpc.StatusCode.INVALID_ARGUMENT, "sampling.prompt_logprobs"),
        (Request(text="x", sampling=common_pb2.SamplingParams(max_tokens=10**6)), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (Request(text="x", n=17), grpc.StatusCode.INVALID_ARGUMENT, "'n'"),
        (Request(text="x", stop=[str(i) for i in range(9)]), grpc.StatusCode.INVALID_ARGUMENT, "stop"),
        (Request(chat=gateway_pb2.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT, "chat"),
        (Request(token_ids=gateway_pb2.TokenIds(ids=[10**6])), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        (Request(model="gpt-4", text="x"), grpc.StatusCode.NOT_FOUND, "gpt-4"),
    ],
)  # fmt: skip
async def test_bad_requests(mesh: Mesh, request_: Request, code: grpc.StatusCode, needle: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(mesh, request_)
    assert err.value.code() is code and needle in err.value.details()
    assert mesh.workers[0].requests == []
    assert "".join(m.text for m in await generate(mesh, Request(text="x"))) == REPLY  # still serving


async def test_cancel_and_deadline_cancel_the_decode_stream(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(worker_kw=[{"hold_after": 1}])  # never finishes by itself
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        call = stub.Generate(Request(text="x"))
        assert (await call.read()).token_ids
        call.cancel()
        await wait_for(lambda: len(mesh.workers[0].cancelled) == 1)
        for timeout_s in DEADLINES_S:
            seen = len(mesh.workers[0].requests)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in stub.Generate(Request(text="x"), timeout=timeout_s)]
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_for(lambda: mesh.gateway.core.in_flight == 0)
            if len(mesh.workers[0].requests) > seen:
                break
        else:
            raise AssertionError("no deadline was long enough for the request to reach the worker")
        # Held after 1 token, none can finish: each one the worker started was cancelled (one that
        # reached it after its gateway call ended is cancelled too, or never starts).
        await wait_for(lambda: len(mesh.workers[0].cancelled) == len(mesh.workers[0].requests))


async def test_a_worker_dying_mid_stream_fails_its_requests_and_a_restart_serves(
    mesh_factory: MeshFactory,
) -> None:
    """The worker's Session stream breaks: the request on it ends with UNAVAILABLE (no hang), and
    once a worker is back at the address the gateway opens a new stream to it."""
    import asyncio

    from scalellm.redis_server import free_port
    from scalellm.v1 import worker_pb2_grpc

    port = free_port()
    mesh = await mesh_factory(workers=0, decode_addrs=(f"w0=127.0.0.1:{port}",))

    async def serve(**kw: int) -> grpc.aio.Server:
        server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(ScriptedDecode(mesh.reply_ids, **kw), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server

    server = await serve(hold_after=1)  # the request is still running when the worker dies
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        call = stub.Generate(Request(text="x"))
        assert (await call.read()).token_ids
        await server.stop(0)  # the worker dies with the request running
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 60)  # a hang guard only
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE, err.value
        await wait_for(lambda: mesh.gateway.core.in_flight == 0)

        server = await serve()
        try:
            messages = await asyncio.wait_for(served_again(stub), 60)  # a hang guard only
            assert "".join(m.text for m in messages) == REPLY
        finally:
            await server.stop(0)


async def served_again(stub: gateway_pb2_grpc.GatewayStub) -> list[gateway_pb2.GatewayGenerateResponse]:
    """Generate until the gateway has reconnected to the restarted worker; until then it answers
    UNAVAILABLE at once (its channel waits out a reconnect backoff of at most 2 s)."""
    import asyncio

    while True:
        try:
            return [m async for m in stub.Generate(Request(text="x"))]
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
            await asyncio.sleep(0.05)


async def test_tokenize_list_models_health_reflection(mesh: Mesh) -> None:
    tok = mesh.gateway.core.model.tokenizer
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        out = await stub.Tokenize(gateway_pb2.TokenizeRequest(text="Hello world"))
        assert list(out.token_ids) == tok.encode("Hello world") and out.max_total_tokens == 8192
        chat = gateway_pb2.ChatMessages(messages=[gateway_pb2.ChatMessage(role="user", content="hi")])
        out = await stub.Tokenize(gateway_pb2.TokenizeRequest(chat=chat))
        assert list(out.token_ids) == tok.encode_chat([{"role": "user", "content": "hi"}])
        models = await stub.ListModels(gateway_pb2.ListModelsRequest())
        assert [m.id for m in models.models] == ["SmolLM2-135M-Instruct"]

        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "scalellm.v1.Gateway"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for r in responses for s in r.list_services_response.service}
        assert {"scalellm.v1.Gateway", "grpc.health.v1.Health"} <= services


async def test_a_chat_can_continue_its_last_message_and_give_the_template_variables(mesh: Mesh) -> None:
    tok = mesh.gateway.core.model.tokenizer
    turns = [("user", "Name three colors."), ("assistant", "Red, ")]
    chat = gateway_pb2.ChatMessages(
        messages=[gateway_pb2.ChatMessage(role=role, content=content) for role, content in turns],
        continue_final_message=True,
    )
    chat.template_kwargs.update({"enable_thinking": False})
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        out = await stub.Tokenize(gateway_pb2.TokenizeRequest(chat=chat))
        text = tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in turns],
            add_generation_prompt=False,
            continue_final_message=True,
        )
        assert text.endswith("<|im_start|>assistant\nRed, ")
        assert list(out.token_ids) == tok.encode(text, add_special_tokens=False)
        chat.template_kwargs.update({"messages": []})
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Tokenize(gateway_pb2.TokenizeRequest(chat=chat))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "messages" in (
            err.value.details() or ""
        )


async def test_oversized_message_is_refused(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(max_payload_bytes=64 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(mesh, Request(text="x" * 100_000))
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "".join(m.text for m in await generate(mesh, Request(text="x"))) == REPLY


async def test_x_request_id_metadata_is_the_answers_request_id(mesh: Mesh) -> None:
    """The HTTP API's X-Request-Id over gRPC: every message carries the client's id; the worker
    sees it with a suffix; a malformed one is INVALID_ARGUMENT naming the metadata key."""
    request = Request(text="hi", sampling=common_pb2.SamplingParams(max_tokens=2))
    messages = await generate(mesh, request, metadata=(("x-request-id", "grpc-trace.9"),))
    assert {m.request_id for m in messages} == {"grpc-trace.9"}
    assert mesh.workers[0].requests[-1].request_id.startswith("grpc-trace.9-")
    async with grpc.aio.insecure_channel(mesh.grpc_address) as channel:  # the answer's id, minted
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(request)
        minted = [m.request_id async for m in call]
        assert dict(await call.initial_metadata())["x-request-id"] == minted[0] != "grpc-trace.9"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(mesh, request, metadata=(("x-request-id", "bad id"),))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "x-request-id" in (
        err.value.details() or ""
    )
