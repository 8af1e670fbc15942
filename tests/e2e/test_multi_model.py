"""Two models and three tenants behind one gateway, on a live mesh started by `scalellm up`:
the demo model and a tiny random Llama (each with its own colocated worker), every answer equal
to its engine alone; /v1/models and ListModels per tenant; unknown or forbidden models are 404
model_not_found (NOT_FOUND on gRPC); a tenant's rpm answers 429 with Retry-After exactly past its
bound; each model's requests reach only its own worker; usage per tenant in the gateway's /metrics."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest

from scalellm.v1 import gateway_pb2, gateway_pb2_grpc
from tests.e2e.test_up import Up, _metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("whole_machine")]

PROMPTS = ["The capital of France is", "Count: one, two,", "Hello, my name is"]
KEYS = (
    "sk-alpha alpha models=smol max_concurrency=4\nsk-beta beta models=tiny rpm=3\nsk-gamma gamma weight=2\n"
)


def engine_texts(model: Path) -> list[str]:
    """The engine alone, greedy, 8 tokens, float32 like the mesh."""
    from scalellm import LLM, SamplingParams

    llm = LLM(model=str(model), num_kv_blocks=128, dtype="float32")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
    return [o.outputs[0].text for o in outs]


def client(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


async def complete_all(base_url: str, key: str, model: str) -> list[str]:
    async with client(base_url, key) as c:
        outs = await asyncio.gather(
            *(c.completions.create(model=model, prompt=p, max_tokens=8, temperature=0) for p in PROMPTS)
        )
    return [o.choices[0].text for o in outs]


async def model_ids(base_url: str, key: str) -> list[str]:
    async with client(base_url, key) as c:
        return sorted([m.id async for m in c.models.list()])


async def not_found(base_url: str, key: str, model: str) -> str:
    async with client(base_url, key) as c:
        with pytest.raises(openai.NotFoundError) as refused:
            await c.completions.create(model=model, prompt="x", max_tokens=2)
    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found", body
    return str(body["message"])


async def grpc_checks(address: str) -> None:
    metadata = (("authorization", "Bearer sk-gamma"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=30)
        assert sorted(m.id for m in listed.models) == ["smol", "tiny"]
        call = stub.Generate(
            gateway_pb2.GatewayGenerateRequest(model="nope", text="x"), metadata=metadata, timeout=30
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _ = [m async for m in call]
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        call = stub.Generate(
            gateway_pb2.GatewayGenerateRequest(model="tiny", text=PROMPTS[0]), metadata=metadata, timeout=60
        )
        assert [m async for m in call][-1].finish_reason


async def rpm_bound(base_url: str) -> None:
    """beta's rpm=3: three requests in its minute are served, the fourth is refused."""
    async with client(base_url, "sk-beta") as c:
        for _ in range(3):
            await c.completions.create(model="tiny", prompt="x", max_tokens=2)
        with pytest.raises(openai.RateLimitError) as refused:
            await c.completions.create(model="tiny", prompt="x", max_tokens=2)
    response = refused.value.response
    assert int(response.headers["retry-after"]) >= 1
    assert "tenant 'beta'" in str(refused.value.body)


def test_two_models_three_tenants_behind_one_gateway(
    demo_model_dir: Path, tiny_chat_model: Path, tmp_path: Path
) -> None:
    expected = {"smol": engine_texts(demo_model_dir), "tiny": engine_texts(tiny_chat_model)}
    assert expected["smol"] != expected["tiny"]  # two different models, told apart by their text
    keys = tmp_path / "keys"
    keys.write_text(KEYS)
    os.chmod(keys, 0o600)
    up = Up("--model", f"smol={demo_model_dir}", "--model", f"tiny={tiny_chat_model}", "--colocated",
            "--decode", "1", "--http-port", "0", "--grpc-port", "0", "--num-kv-blocks", "256",
            "--dtype", "float32", "--startup-timeout", "120", "--drain-timeout", "5",
            f"--gateway-arg=--api-keys-file={keys}")  # fmt: skip
    pids: dict[int, str] = {}
    try:
        ready = up.wait_for("mesh ready: ", timeout=180)
        pids = up.pids()
        base_url, grpc_address = ready.split()[2], ready.split()[4]
        children = {m for line in up.lines for m in re.findall(r"started (\S+) pid=", line)}
        assert {"decode-1", "tiny-decode-1", "gateway"} <= children, children

        async def scenario() -> None:
            smol, tiny = await asyncio.gather(
                complete_all(base_url, "sk-gamma", "smol"), complete_all(base_url, "sk-gamma", "tiny")
            )
            assert smol == expected["smol"] and tiny == expected["tiny"]
            assert await complete_all(base_url, "sk-alpha", "smol") == expected["smol"]
            assert await model_ids(base_url, "sk-gamma") == ["smol", "tiny"]
            assert await model_ids(base_url, "sk-alpha") == ["smol"]
            assert "tenant 'alpha' may not use it" in await not_found(base_url, "sk-alpha", "tiny")
            assert "does not exist" in await not_found(base_url, "sk-gamma", "nope")
            await rpm_bound(base_url)
            await grpc_checks(grpc_address)

        asyncio.run(scenario())

        served = {
            name: _metrics(url)
            for name, url in re.findall(r"ready ((?:tiny-)?decode-1) .* metrics=(\S+)", "\n".join(up.lines))
        }
        finished = {
            n: sum(v for k, v in m.items() if k.startswith("scalellm_requests_total"))
            for n, m in served.items()
        }
        # smol: 3 (gamma) + 3 (alpha); tiny: 3 (gamma) + 3 (beta) + 1 (gRPC): each on its own worker.
        assert finished == {"decode-1": 6, "tiny-decode-1": 7}, finished
        gateway_metrics = (
            urllib.request.urlopen(
                urllib.request.Request(
                    base_url.removesuffix("/v1") + "/metrics", headers={"Authorization": "Bearer sk-gamma"}
                ),
                timeout=30,
            )
            .read()
            .decode()
        )
        assert 'scalellm_gateway_tenant_requests_total{tenant="beta"} 3.0' in gateway_metrics
        assert 'scalellm_gateway_rate_limited_total{limit="rpm",tenant="beta"} 1.0' in gateway_metrics
        assert re.search(
            r'scalellm_gateway_tenant_tokens_total\{kind="completion",tenant="alpha"\} 24.0', gateway_metrics
        )
        assert up.stop() == 0, up.log()
    finally:
        up.cleanup(pids)
