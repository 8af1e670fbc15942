"""The whole mesh as processes: Redis, a kvstore, a colocated decode worker on the demo model and two
gateways (one routing from the kvstore, one with a static --decode-addr), driven by the official
OpenAI client and a gRPC client. Greedy text must equal the engine alone."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from scalellm.redis_server import RedisServer, free_port
from scalellm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.procs import ROOT, Service, start_service

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12


@dataclass
class Expected:
    completions: list[str]
    completion_tokens: list[int]
    chat: str


@dataclass
class Gateway:
    service: Service
    http: str
    grpc: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.http}/v1", api_key="none", max_retries=0)


@dataclass
class Mesh:
    registry_gw: Gateway
    static_gw: Gateway
    decode_metrics: str


@pytest.fixture(scope="module")
def expected(demo_model_dir: Path) -> Expected:
    from scalellm import LLM, SamplingParams

    llm = LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=200)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outs = llm.generate(PROMPTS, greedy)
    [chat] = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=24))
    return Expected(
        [o.outputs[0].text for o in outs], [len(o.outputs[0].token_ids) for o in outs], chat.outputs[0].text
    )


def _wait_health(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, f"{url} never became healthy"
        time.sleep(0.1)


def _start_kvstore(redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [
        "--listen",
        f"127.0.0.1:{port}",
        "--redis-url",
        redis_url,
        "--lease-s",
        "3",
        "--metrics-port",
        "0",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "services.kvstore", *args], cwd=ROOT)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return proc, f"127.0.0.1:{port}"


def _start_gateway(model: Path, *workers: str) -> Gateway:
    args = ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--model", str(model), *workers]
    service = start_service("services.gateway", args, name="gateway")
    assert service.ready is not None
    gateway = Gateway(service, service.address, service.ready.fields["grpc"])
    _wait_health(f"http://{gateway.http}/health")  # 200 once a decode worker is routable
    return gateway


@pytest.fixture(scope="module")
def mesh(demo_model_dir: Path, expected: Expected) -> Iterator[Mesh]:
    with RedisServer() as redis:
        kvstore, kv_address = _start_kvstore(redis.url)
        metrics_port = free_port()
        decode = start_service(
            "services.decode",
            [
                "--role", "both", "--model", str(demo_model_dir), "--listen", "127.0.0.1:0",
                "--advertise-host", "127.0.0.1", "--transfer-listen", "127.0.0.1:0", "--num-kv-blocks", "400",
                "--num-threads", "1", "--metrics-port", str(metrics_port), "--kvstore", kv_address,
                "--dtype", "float32",
            ],
        )  # fmt: skip
        gateways: list[Gateway] = []
        try:
            gateways.append(_start_gateway(demo_model_dir, "--kvstore", kv_address))
            gateways.append(_start_gateway(demo_model_dir, "--decode-addr", decode.address))
            yield Mesh(gateways[0], gateways[1], f"http://127.0.0.1:{metrics_port}/metrics")
        finally:
            for gateway in gateways:
                assert gateway.service.stop() == 0, gateway.service.log()
            decode.stop()
            kvstore.terminate()
            kvstore.wait(10)


def test_completions_equal_the_engine(mesh: Mesh, expected: Expected) -> None:
    client = mesh.registry_gw.client()
    for prompt, text, tokens in zip(PROMPTS, expected.completions, expected.completion_tokens, strict=True):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].text == text
        assert out.usage.completion_tokens == tokens and out.usage.prompt_tokens > 0


def test_chat_and_stream_equal_the_engine(mesh: Mesh, expected: Expected) -> None:
    client = mesh.registry_gw.client()
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert out.choices[0].message.content == expected.chat
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"x-scalellm-timings": "1"},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.chat
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    timings = final.choices[0].model_extra["timings"]
    assert timings["prefill"] > 0 and timings["decode"] > 0 and timings["gateway"] < timings["total"]
    worker_span = timings["queue"] + timings["prefill"] + timings["transfer"] + timings["decode"]
    assert worker_span < timings["worker_call"] < timings["total"]  # the gateway's view wraps the worker's


def test_static_gateway_n_and_stop(mesh: Mesh, expected: Expected) -> None:
    client = mesh.static_gw.client()
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, n=2)
    assert [c.text for c in out.choices] == [expected.completions[0]] * 2
    stop = expected.completions[0].strip().split()[1]  # a word inside the greedy text
    cut = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == expected.completions[0][: expected.completions[0].index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_grpc_generate_equals_the_engine(mesh: Mesh, expected: Expected) -> None:
    with grpc.insecure_channel(mesh.static_gw.grpc) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.GatewayGenerateRequest(
            text=PROMPTS[1], sampling=common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        )
        messages = list(stub.Generate(request))
    assert "".join(m.text for m in messages) == expected.completions[1]
    assert messages[-1].usage.completion_tokens == expected.completion_tokens[1]
    assert messages[-1].timings.prefill > 0 and messages[-1].timings.gateway > 0


def _metric(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        text = response.read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_disconnect_cancels_the_decode_stream(mesh: Mesh) -> None:
    client = mesh.registry_gw.client()
    before = _metric(mesh.decode_metrics, "scalellm_generated_tokens_total")
    stream = client.completions.create(
        model=MODEL,
        prompt="Count:",
        max_tokens=2000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    assert _metric(mesh.decode_metrics, "scalellm_running_batch") == 1
    stream.close()  # the client goes away
    deadline = time.monotonic() + 120  # a hang guard only
    while _metric(mesh.decode_metrics, "scalellm_running_batch") != 0:
        assert time.monotonic() < deadline, "the decode worker kept generating for a gone client"
        time.sleep(0.05)
    generated = _metric(mesh.decode_metrics, "scalellm_generated_tokens_total") - before
    assert generated < 1000, generated  # stopped early, not at its 2000 tokens
