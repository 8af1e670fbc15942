"""The gateway in-process (HTTP + gRPC) in front of scripted decode workers defined here.

The scripted worker streams a fixed reply (multi-byte characters included) one token per message,
honours max_tokens and resume_token_ids (a migrated stream continues where the reply stood), can
refuse with RESOURCE_EXHAUSTED, can hold a stream after some tokens until the test releases it
(so "still running" never depends on timing), can abort after some tokens as a draining worker
does, and records which streams were cancelled.
The gateway reaches it over the worker's real Session code (services/decode/session.py). The
fixtures that start them (served_config, served_model, mesh_factory, mesh) are in
tests/unit/conftest.py, for every gateway test module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scalellm.registry import WorkerRole
from scalellm.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from scalellm.worker.errors import ResourceExhausted
from services.decode.session import serve_session
from services.gateway.admission import ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.openai_format import parse_events
from services.gateway.routing import WorkerEndpoint, WorkerSet
from services.gateway.server import GatewayServer

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

REPLY = "Hello! The café costs 5€. 😀 Done, stop here."
EOS = 2


class ScriptedDecode(worker_pb2_grpc.DecodeWorkerServicer):
    """A decode worker that replies REPLY (then EOS), one token per message; with hold_after, each
    stream stops after that many tokens until `release` is set."""

    def __init__(
        self,
        reply_ids: list[int],
        *,
        hold_after: int | None = None,
        exhausted: bool = False,
        abort_after: int | None = None,
    ) -> None:
        self.reply_ids = reply_ids
        self.hold_after = hold_after
        self.abort_after = abort_after
        self.abort_once = False  # abort only the first stream that reaches abort_after
        self.release = asyncio.Event()
        self.exhausted = exhausted
        self.requests: list[worker_pb2.GenerateRequest] = []
        self.sent = 0  # tokens sent, all streams together
        self.cancelled: list[str] = []
        self.completed: list[str] = []

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        try:
            async for message in self.reply(request):
                yield message
        except ResourceExhausted as exc:
            await context.abort(exc.code, str(exc))

    async def Session(
        self, request_iterator: AsyncIterator[worker_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.SessionResponse]:
        await context.send_initial_metadata(())  # accepted, as the worker's servicer says
        async for response in serve_session(request_iterator, self.reply):  # the worker's own session
            yield response

    async def reply(
        self, request: worker_pb2.GenerateRequest
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        self.requests.append(request)
        if self.exhausted:
            raise ResourceExhausted("no KV blocks free")
        ids = [*self.reply_ids, EOS]
        stops = set(request.sampling.stop_token_ids)  # end on them as the engine does
        ids = ids[: next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))]
        limit = request.sampling.max_tokens or len(ids)
        resumed = len(request.resume_token_ids)
        assert list(request.resume_token_ids) == ids[:resumed], "a migration resumes what was sent"
        ids = ids[:limit]
        try:
            for i, token in enumerate(ids[resumed:], start=resumed):
                if i == self.hold_after:
                    await self.release.wait()
                if i == self.abort_after:
                    if self.abort_once:
                        self.abort_after = None
                    yield worker_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_ABORT)
                    return
                msg = worker_pb2.GenerateResponse(token_ids=[token])
                if request.sampling.HasField("logprobs"):
                    top = [
                        common_pb2.TopLogprob(token_id=token + k, logprob=-0.1 * (k + 1))
                        for k in range(request.sampling.logprobs)
                    ]
                    msg.logprobs.add(token_id=token, logprob=-0.25, top=top)
                if i == 0 and request.sampling.HasField("prompt_logprobs"):
                    for t in request.prompt_token_ids[1:]:  # the prompt's: -0.5 each, t + 1 the top (-0.125)
                        top = [common_pb2.TopLogprob(token_id=t + 1, logprob=-0.125)][
                            : request.sampling.prompt_logprobs
                        ]
                        msg.prompt_logprobs.add(token_id=t, logprob=-0.5, top=top)
                if i == len(ids) - 1:
                    msg.finish_reason = (
                        common_pb2.FINISH_REASON_STOP
                        if token == EOS or token in stops
                        else common_pb2.FINISH_REASON_LENGTH
                    )
                    msg.usage.CopyFrom(
                        common_pb2.Usage(
                            prompt_tokens=len(request.prompt_token_ids), completion_tokens=len(ids)
                        )
                    )
                    msg.timings.CopyFrom(common_pb2.Timings(queue=0.001, prefill=0.002, decode=0.003))
                self.sent += 1
                yield msg
            self.completed.append(request.request_id)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(request.request_id)
            raise


@dataclass
class Mesh:
    gateway: GatewayServer
    workers: list[ScriptedDecode]
    reply_ids: list[int]
    servers: list[grpc.aio.Server] = field(default_factory=list)
    """The scripted workers' servers (stop one to kill its worker)."""
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    def client(self, key: str = "none") -> openai.AsyncOpenAI:
        """An official OpenAI client on the gateway (closed at teardown)."""
        client = openai.AsyncOpenAI(base_url=self.http + "/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client


MeshFactory = Callable[..., Awaitable[Mesh]]


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Wait until predicate() holds; timeout_s is a hang guard only."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# Deadlines to try in turn, each until the request reached the worker before it ran out: a loaded
# machine may take longer than the first to forward it, and a request the worker never started
# tells nothing about cancelling it.
DEADLINES_S = (0.3, 1.0, 3.0, 10.0, 30.0)


# -- OpenAI HTTP through the official client --------------------------------------------------------


async def test_chat_completion(mesh: Mesh) -> None:
    out = await mesh.client().chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "hi"}]
    )
    assert out.choices[0].message.content == REPLY and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    prompt = mesh.workers[0].requests[0].prompt_token_ids
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(mesh.reply_ids) + 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # The chat template was applied and the default max_tokens fills the context.
    text = mesh.gateway.core.model.tokenizer.decode(prompt, skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert mesh.workers[0].requests[0].sampling.max_tokens == 8192 - len(prompt)
    await wait_for(lambda: len(mesh.workers[0].completed) == 1)
    assert mesh.workers[0].cancelled == []  # a finished stream is not cancelled


async def test_completion_stream_with_usage(mesh: Mesh) -> None:
    stream = await mesh.client().completions.create(
        model="SmolLM2-135M-Instruct", prompt="Say hi", max_tokens=100, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(mesh.reply_ids) + 1
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_sse_framing(mesh: Mesh) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            mesh.http + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 4},
        ) as resp,
    ):
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and raw.startswith(b"data: {")
    events = parse_events(raw)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
        == REPLY[: len("Hello! The café")]
    )


async def test_max_tokens_gives_length(mesh: Mesh) -> None:
    out = await mesh.client().completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=2)
    assert out.choices[0].text == "Hello!" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 2


async def test_completions_default_max_tokens_is_16(mesh: Mesh) -> None:
    await mesh.client().completions.create(model="SmolLM2-135M-Instruct", prompt="x")
    assert mesh.workers[0].requests[0].sampling.max_tokens == 16


def tokens_until(mesh: Mesh, text: str) -> int:
    """How many tokens of the reply it takes for its text to contain `text`."""
    tok = mesh.gateway.core.model.tokenizer
    return next(k for k in range(len(mesh.reply_ids) + 1) if text in tok.decode(mesh.reply_ids[:k]))


async def test_stop_string_cuts_exactly_and_cancels(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory()
    mesh.workers[0].hold_after = tokens_until(mesh, "5€")  # the rest only comes if nobody cancels
    out = await mesh.client().chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "x"}], stop=["5€", "zzz"]
    )
    assert (
        out.choices[0].message.content == "Hello! The café costs " and out.choices[0].finish_reason == "stop"
    )
    assert out.usage.completion_tokens < len(mesh.reply_ids)
    await wait_for(lambda: len(mesh.workers[0].cancelled) == 1)
    assert mesh.workers[0].completed == []


async def test_stop_string_streaming_never_leaks_the_stop(mesh: Mesh) -> None:
    stream = await mesh.client().completions.create(
        model="SmolLM2-135M-Instruct", prompt="x", max_tokens=50, stop="Done", stream=True
    )
    text = "".join([c.choices[0].text async for c in stream])
    assert text == "Hello! The café costs 5€. 😀 "


async def test_the_token_that_stopped_the_answer_is_not_in_its_text(mesh: Mesh) -> None:
    """As in vLLM: the EOS (with special tokens kept) or a token of stop_token_ids ends the answer
    and counts as a completion token, but its text is left out unless include_stop_str_in_output."""
    client, tok = mesh.client(), mesh.gateway.core.model.tokenizer
    ask: Any = [{"role": "user", "content": "x"}]
    model = "SmolLM2-135M-Instruct"
    special = {"skip_special_tokens": False}
    out = await client.chat.completions.create(model=model, messages=ask, extra_body=special)
    assert out.choices[0].message.content == REPLY and out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == len(mesh.reply_ids) + 1
    keep = {**special, "include_stop_str_in_output": True}
    out = await client.chat.completions.create(model=model, messages=ask, extra_body=keep)
    assert out.choices[0].message.content == REPLY + tok.decode([EOS], skip_special_tokens=False)

    k = next(i for i in range(2, len(mesh.reply_ids)) if mesh.reply_ids[i] not in mesh.reply_ids[:i])
    stop = {"stop_token_ids": [mesh.reply_ids[k]]}  # an ordinary token, its first time in the reply
    out = await client.chat.completions.create(model=model, messages=ask, extra_body=stop)
    assert out.choices[0].message.content == tok.decode(mesh.reply_ids[:k])
    assert (
        out.choices[0].finish_reason == "stop"
        and out.usage is not None
        and out.usage.completion_tokens == k + 1
    )
    stream = await client.chat.completions.create(model=model, messages=ask, extra_body=stop, stream=True)
    deltas = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(deltas) == tok.decode(mesh.reply_ids[:k])


async def test_truncate_prompt_tokens_keeps_the_prompts_end(mesh: Mesh) -> None:
    """vLLM's left truncation: the worker gets the prompt's last k tokens; -1 keeps what the limit
    allows; a bad k is a 400 naming the field."""
    client, model = mesh.client(), "SmolLM2-135M-Instruct"
    ids = list(range(100, 110))
    out = await client.completions.create(
        model=model, prompt=ids, max_tokens=2, extra_body={"truncate_prompt_tokens": 4}
    )
    assert list(mesh.workers[0].requests[-1].prompt_token_ids) == ids[-4:]
    assert out.usage is not None and out.usage.prompt_tokens == 4
    await client.completions.create(
        model=model, prompt=ids, max_tokens=2, extra_body={"truncate_prompt_tokens": -1}
    )
    assert list(mesh.workers[0].requests[-1].prompt_token_ids) == ids
    ask: Any = [{"role": "user", "content": "hi"}]
    await client.chat.completions.create(model=model, messages=ask, extra_body={"truncate_prompt_tokens": 3})
    assert len(mesh.workers[0].requests[-1].prompt_token_ids) == 3
    for bad in (0, -2, 10**9):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(
                model=model, prompt=ids, extra_body={"truncate_prompt_tokens": bad}
            )
        assert caught.value.body["param"] == "truncate_prompt_tokens", bad  # type: ignore[index]


async def test_n_fans_out(mesh_factory: MeshFactory) -> None:
    mesh = await mesh_factory(workers=2)
    out = await mesh.client().chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "x"}],
        n=4,
        seed=7,
        temperature=0.5,
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.message.content == REPLY for c in out.choices)
    ids = sorted(r.request_id for w in mesh.workers for r in w.requests)
    assert len(set(ids)) == 4 and all(len(w.requests) == 2 for w in mesh.workers)  # spread over both
    assert out.usage.completion_tokens == 4 * (len(mesh.reply_ids) + 1)
    assert out.usage.prompt_tokens == len(mesh.workers[0].requests[0].prompt_token_ids)
    sent = [r.sampling for w in mesh.workers for r in w.requests]
    assert sorted(s.seed for s in sent) == [7, 8, 9, 10]  # choice k samples with seed + k
    assert all(s.temperature == pytest.approx(0.5) for s in sent)


async def test_n_streams_interleave(mesh: Mesh) -> None:
    stream = await mesh.client().completions.create(
        model="SmolLM2-135M-Instruct", prompt="x", n=3, max_tokens=100, stream=True
    )
    texts = ["", "", ""]
    async for chunk in stream:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [REPLY] * 3


async def test_logprobs(mesh: Mesh) -> None:
    client = mesh.client()
    out = await client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "x"}],
        logprobs=True,
        top_logprobs=2,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == len(mesh.reply_ids) + 1 and all(len(c.top_logprobs) == 2 for c in content)
    assert bytes(b for c in content for b in c.bytes).decode() == REPLY + "<|im_end|>"
    assert content[0].logprob == pytest.approx(-0.25) and mesh.workers[0].requests[0].sampling.logprobs == 2
    comp = await client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="x", logprobs=1, max_tokens=3
    )
    lp = comp.choices[0].logprobs
    assert (
        lp.tokens == ["Hello", "!", " The"] and lp.text_offset == [0, 5, 6] and len(lp.top_logprobs[0]) == 1
    )


async def test_timings_opt_in(mesh: Mesh) -> None:
    client = mesh.client()
    messages = [{"role": "user", "content": "x"}]
    plain = await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages)
    assert "timings" not in (plain.choices[0].model_extra or {})
    timed = await client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=messages, extra_headers={"x-scalellm-timings": "1"}
    )
    timings = timed.choices[0].model_extra["timings"]
    assert set(timings) == {
        "gateway", "queue", "prefill", "transfer", "decode", "transfer_bytes", "total", "worker_call",
        "migrations",
        "remote_prefill", "prompt_blocks", "routed_cached_blocks", "routed_ahead_tokens",
    }  # fmt: skip
    assert timings["queue"] == pytest.approx(0.001) and 0 < timings["gateway"] < timings["total"]
    assert 0 < timings["worker_call"] < timings["total"]  # the worker's stream, inside the total


async def test_models_and_health(mesh: Mesh) -> None:
    models = await mesh.client().models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    assert (await mesh.client().models.retrieve("SmolLM2-135M-Instruct")).id == "SmolLM2-135M-Instruct"
    with pytest.raises(openai.NotFoundError):
        await mesh.client().models.retrieve("gpt-4")
    async with aiohttp.ClientSession() as session, session.get(mesh.http + "/health") as resp:
        assert resp.status == 200 and (await resp.json())["decode_workers"] == 1


async def test_responses_carry_the_request_id_the_worker_got(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            body = {"prompt": "x", "max_tokens": 2, "stream": stream}
            async with session.post(mesh.http + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.read()
                request_id = resp.headers["x-request-id"]
            assert mesh.workers[0].requests[-1].request_id == f"{request_id}-0"  # its choice 0
    assert len({r.request_id for r in mesh.workers[0].requests}) == 2


class SwitchableWorkers:
    """A worker source the test changes: no decode worker at first."""

    def __init__(self) -> None:
        self.workers = WorkerSet()

    def current(self) -> WorkerSet:
        return self.workers


async def test_health_is_503_without_a_decode_worker(
    served_config: GatewayConfig, served_model: ServedModel
) -> None:
    source = SwitchableWorkers()
    gateway = GatewayServer(served_config, source=source, model=served_model)
    await gateway.start()
    http = f"http://127.0.0.1:{gateway.http_port}"
    try:
        async with (
            aiohttp.ClientSession() as session,
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            async with session.get(http + "/health") as resp:
                assert resp.status == 503 and (await resp.json())["status"] == "no_workers"
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
            async with session.post(http + "/v1/completions", json={"prompt": "x"}) as resp:
                assert resp.status == 503 and (await resp.json())["error"]["type"] == "service_unavailable"

            source.workers = WorkerSet(
                (WorkerEndpoint(worker_id="w", address="127.0.0.1:1", role=WorkerRole.BOTH),)
            )
            watch = health.Watch(health_pb2.HealthCheckRequest())
            async for reply in watch:  # the gateway notices the new worker set on its own
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            watch.cancel()
            async with session.get(http + "/health") as resp:
                assert resp.status == 200 and (await resp.json())["decode_workers"] == 1
    finally:
        await gateway.stop(0)


async def test_unknown_model_is_404(mesh: Mesh) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await mesh.client().completions.create(model="gpt-4", prompt="x")
    assert info.value.body["code"] == "model_not_found"
    assert mesh.workers[0].requests == []


async def test_metrics(mesh: Mesh) -> None:
    await mesh.client().completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        await mesh.client().completions.create(model="SmolLM2-135M-Instruct", prompt="x", max_tokens=-1)
    async with aiohttp.ClientSession() as session, session.get(mesh.http + "/metrics") as resp:
        text = await resp.text()
    assert 'scalellm_gateway_requests_total{api="completions",outcome="ok"} 1.0' in text
    assert 'scalellm_gateway_errors_total{api="completions",kind="invalid"} 1.0' in text
    assert "scalellm_gateway_time_to_first_token_seconds_count 1.0" in text
    assert "scalellm_gateway_time_per_output_token_seconds_count 1.0" in text
    assert "scalellm_gateway_requests_in_flight 0.0" in text
    assert 'scalellm_gateway_workers{kind="decode"} 1.0' in text


async def replying(mesh_factory: MeshFactory, text: str, **config: Any) -> Mesh:
    """A mesh (config: mesh_factory's arguments) whose scripted worker replies with text."""
    mesh = await mesh_factory(**config)
    mesh.workers[0].reply_ids = mesh.gateway.core.model.tokenizer.encode(text, add_special_tokens=False)
    return mesh
