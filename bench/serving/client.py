"""One streaming /v1/completions request, and a run of many: fixed concurrency or Poisson arrivals."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.serving.metrics import RequestResult
from bench.serving.sse import SSEParser
from bench.serving.workload import BenchRequest


@dataclass(frozen=True)
class RunConfig:
    base_url: str
    """Up to and including /v1, e.g. http://127.0.0.1:8000/v1."""
    model: str
    max_concurrency: int | None = None
    """Streams open at once; None: no limit (then request_rate paces the run)."""
    request_rate: float = float("inf")
    """Poisson arrivals per second; inf sends every request at once (bounded by max_concurrency)."""
    ignore_eos: bool = False
    """Send the vLLM extension `ignore_eos` (our gateway and the baseline honour it)."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    timeout_s: float = 600.0
    seed: int = 0


def payload(config: RunConfig, request: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model,
        "prompt": request.prompt,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    return {**body, **config.extra_body}


async def send(session: aiohttp.ClientSession, config: RunConfig, request: BenchRequest) -> RequestResult:
    """Stream one completion; TTFT at the first chunk whose text is not empty."""
    result = RequestResult(prompt_len=request.prompt_len)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    chunks, parser, pieces = 0, SSEParser(), []
    start = last = time.perf_counter()
    try:
        async with session.post(
            f"{config.base_url}/completions", json=payload(config, request), headers=headers
        ) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            done = False
            async for raw in response.content.iter_any():
                now = time.perf_counter()
                for data in parser.feed(raw):
                    if data.strip() == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        result.error = str(event["error"])[:200]
                        return result
                    text = "".join(c.get("text") or "" for c in event.get("choices") or [])
                    if text:
                        if chunks == 0:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last, chunks = now, chunks + 1
                        pieces.append(text)
                    usage = event.get("usage")
                    if usage:
                        result.usage_reported = True
                        result.output_tokens = int(usage.get("completion_tokens") or 0)
                        result.prompt_len = int(usage.get("prompt_tokens") or request.prompt_len)
                        details = usage.get("prompt_tokens_details") or {}
                        result.cached_tokens = int(details.get("cached_tokens") or 0)
            result.latency = time.perf_counter() - start
            if not result.usage_reported:
                result.output_tokens = chunks  # one token per chunk: the best guess without usage
            result.text = "".join(pieces)
            result.success = chunks > 0 and (done or result.usage_reported)
            if not result.success:
                result.error = "stream ended without content or [DONE]"
    except Exception as exc:  # any failure is this request's, never the run's
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: exponential gaps (Poisson), all zero for rate inf."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


async def run(
    config: RunConfig, requests: list[BenchRequest], progress: bool = True
) -> tuple[list[RequestResult], float]:
    """Send every request; return the results (in request order) and the run's wall time."""
    from tqdm.asyncio import tqdm

    bar = tqdm(
        total=len(requests),
        disable=not progress,
        desc=f"c={config.max_concurrency}" if config.max_concurrency else f"rate={config.request_rate}",
    )
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(request: BenchRequest) -> RequestResult:
            if limit is None:
                result = await send(session, config, request)
            else:
                async with limit:
                    result = await send(session, config, request)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request, gap in zip(
            requests, arrival_gaps(len(requests), config.request_rate, config.seed), strict=True
        ):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


async def first_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id /v1/models lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/models", headers=headers) as r:
        r.raise_for_status()
        return str((await r.json())["data"][0]["id"])
