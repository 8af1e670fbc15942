"""Prefix-aware routing through the whole mesh: a kvstore over real Redis, two decode workers and a
prefill worker (processes, tiny model with the demo tokenizer) that publish their block hashes,
and an in-process gateway routing from the registry. A conversation's next turn goes back to the
decode worker that holds its history and is prefilled there; a long new prompt goes to the
prefill worker; the answers equal the engine alone; /metrics and the timings show the hits."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from scalellm import LLM, SamplingParams
from scalellm.kvhash import prompt_block_hashes
from scalellm.redis_server import RedisServer
from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayServer
from services.kvstore.config import KvstoreConfig
from services.kvstore.server import KvstoreServer
from tests.procs import Service, start_service
from tests.service.worker_calls import worker_args

pytestmark = pytest.mark.slow

BS = 16
TURN1 = [(i * 37) % 4000 + 100 for i in range(600)]  # 600 new tokens: more than one local prefill
TURN2 = TURN1 + [5, 6, 7, 8] * 20  # the next turn: the whole history and 80 new tokens


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def kvstore(redis: RedisServer) -> AsyncIterator[str]:
    server = KvstoreServer(
        KvstoreConfig(
            listen="127.0.0.1:0",
            redis_url=redis.url,
            lease_s=3.0,
            reap_interval_s=0.05,
            metrics_port=0,
            grace_s=0,
        )
    )
    await server.start()
    yield f"127.0.0.1:{server.port}"
    await server.stop(0)


@pytest.fixture
def workers(tiny_chat_model: Path, kvstore: str) -> Iterator[list[Service]]:
    started = [
        start_service(
            "services.decode",
            worker_args(tiny_chat_model, "--role", "decode", "--worker-id", f"d{i}", "--kvstore", kvstore),
        )
        for i in range(2)
    ]
    started.append(
        start_service(
            "services.prefill", worker_args(tiny_chat_model, "--worker-id", "p0", "--kvstore", kvstore)
        )
    )
    yield started
    for svc in started:
        assert svc.stop() == 0, svc.log()


def _engine(tiny_chat_model: Path, prompts: list[list[int]]) -> list[str]:
    """The engine alone on the same weights (as worker_args): what the mesh must answer."""
    llm = LLM(model=str(tiny_chat_model), num_kv_blocks=400, dtype="float32")
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    return [o.outputs[0].text for o in outs]


async def _complete(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int]
) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    async with session.post(url, json=body, headers={"x-scalellm-timings": "1"}) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def _routes(metrics: str, name: str) -> dict[tuple[str, str], float]:
    pattern = rf'^{name}_total\{{prefill="(\w+)",worker="([\w-]+)"\}} (\S+)$'
    return {(w, p): float(v) for p, w, v in re.findall(pattern, metrics, re.M)}


async def test_a_conversation_returns_to_its_worker_and_answers_stay_exact(
    tiny_chat_model: Path, kvstore: str, workers: list[Service]
) -> None:
    expected = _engine(tiny_chat_model, [TURN1, TURN2])
    gateway = GatewayServer(
        GatewayConfig(
            host="127.0.0.1", http_port=0, grpc_port=0, model=str(tiny_chat_model), kvstore=(kvstore,)
        )
    )
    await gateway.start()
    assert gateway.view is not None and gateway.core is not None
    view = gateway.view
    await view.wait_until(lambda s: len(s.ids) == 3, 120)  # a hang guard only
    url = f"http://127.0.0.1:{gateway.http_port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as session:
            first = await _complete(session, url, tiny_chat_model.name, TURN1)
            timings = first["choices"][0]["timings"]
            assert timings["remote_prefill"] and timings["routed_cached_blocks"] == 0
            routes = _routes(gateway.core.metrics.render().decode(), "scalellm_gateway_routes")
            assert routes == {("p0", "remote"): 1.0}  # counted where the prompt was computed
            # Both the prefill worker and the decode worker it pushed to publish the prompt's blocks.
            chain = prompt_block_hashes(TURN2, BS)[: len(TURN1) // BS]
            await view.wait_until(
                lambda _s: (
                    view.blocks.matched_blocks("p0", chain) == len(chain)
                    and max(view.blocks.matched_blocks(d, chain) for d in ("d0", "d1")) == len(chain)
                ),
                60,
            )
            holder = next(d for d in ("d0", "d1") if view.blocks.matched_blocks(d, chain) == len(chain))
            second = await _complete(session, url, tiny_chat_model.name, TURN2)
    finally:
        await gateway.stop()
    timings = second["choices"][0]["timings"]
    assert not timings["remote_prefill"] and timings["routed_cached_blocks"] == len(TURN1) // BS
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(TURN1) // BS * BS
    metrics = gateway.core.metrics.render().decode()
    assert _routes(metrics, "scalellm_gateway_route_cached_blocks")[(holder, "local")] == len(TURN1) // BS
    assert [first["choices"][0]["text"], second["choices"][0]["text"]] == expected
