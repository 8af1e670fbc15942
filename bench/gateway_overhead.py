"""The gateway's own cost: the same streams through the gateway and straight to the decode worker.

Starts a colocated decode worker on the model (default: the prepared demo model) and a gateway
pointing at it (static --decode-addr), then, at each concurrency level, runs greedy requests of the
same shape (fresh random prompts for every path, so the prefix cache favours none; fixed lengths;
ignore_eos) three ways, interleaved round by round so that drift hits them alike:

  direct        gRPC DecodeWorker.Generate on the worker
  gateway-grpc  gRPC Gateway.Generate on the gateway
  gateway-http  POST /v1/completions with "stream": true (SSE) on the gateway

and reports TTFT and end-to-end latency (p50, p99) and the ratio of each gateway path to direct.

    python bench/gateway_overhead.py [--concurrency 1 8 32 64] [--requests 64] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scalellm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

Sample = tuple[float, float]  # (ttft, e2e) seconds
Path_ = Callable[[list[int]], Awaitable[Sample]]


def start(module: str, args: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Run `python -m module args`; return the process and its READY line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READY "):
            return proc, line.strip()
    raise RuntimeError(f"{module} exited before it was ready")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Paths:
    """The three ways of running one request; each returns (ttft, e2e)."""

    def __init__(self, worker: str, gw_grpc: str, gw_http: str, max_tokens: int) -> None:
        self.sampling = common_pb2.SamplingParams(
            temperature=0, top_p=1.0, max_tokens=max_tokens, ignore_eos=True
        )  # exactly what the gateway sends
        self.max_tokens = max_tokens
        self.worker_channel = grpc.aio.insecure_channel(worker)
        self.gateway_channel = grpc.aio.insecure_channel(gw_grpc)
        self.worker = worker_pb2_grpc.DecodeWorkerStub(self.worker_channel)
        self.gateway = gateway_pb2_grpc.GatewayStub(self.gateway_channel)
        self.http_url = f"http://{gw_http}/v1/completions"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def _stream(self, call: grpc.aio.UnaryStreamCall) -> Sample:
        start, ttft = time.perf_counter(), None
        async for message in call:
            if ttft is None and message.token_ids:
                ttft = time.perf_counter() - start
        return ttft or 0.0, time.perf_counter() - start

    async def direct(self, prompt: list[int]) -> Sample:
        request = worker_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=prompt, sampling=self.sampling
        )
        return await self._stream(self.worker.Generate(request))

    async def gateway_grpc(self, prompt: list[int]) -> Sample:
        request = gateway_pb2.GatewayGenerateRequest(
            token_ids=gateway_pb2.TokenIds(ids=prompt), sampling=self.sampling
        )
        return await self._stream(self.gateway.Generate(request))

    async def gateway_http(self, prompt: list[int]) -> Sample:
        body = {
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        }
        start, ttft = time.perf_counter(), None
        async with self.session.post(self.http_url, json=body) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if ttft is None and line.startswith(b"data: {"):
                    ttft = time.perf_counter() - start
        return ttft or 0.0, time.perf_counter() - start

    async def gateway_overhead(self) -> tuple[float, float]:
        """(sum, count) of scalellm_gateway_overhead_seconds: the gateway's own time per request."""
        async with self.session.get(self.http_url.replace("/v1/completions", "/metrics")) as response:
            text = await response.text()
        values = {}
        for line in text.splitlines():
            for key in ("sum", "count"):
                if line.startswith(f"scalellm_gateway_overhead_seconds_{key} "):
                    values[key] = float(line.split()[1])
        return values.get("sum", 0.0), values.get("count", 0.0)

    async def close(self) -> None:
        await self.session.close()
        await self.worker_channel.close()
        await self.gateway_channel.close()


async def run_level(path: Path_, prompts: list[list[int]], concurrency: int) -> list[Sample]:
    """Run every prompt through path with `concurrency` streams open at once."""
    queue = list(reversed(prompts))
    samples: list[Sample] = []

    async def client() -> None:
        while queue:
            samples.append(await path(queue.pop()))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(args: argparse.Namespace, worker: str, gw_grpc: str, gw_http: str) -> list[dict[str, float]]:
    paths = Paths(worker, gw_grpc, gw_http, args.max_tokens)
    rng = random.Random(0)
    named: dict[str, Path_] = {
        "direct": paths.direct, "gateway-grpc": paths.gateway_grpc, "gateway-http": paths.gateway_http,
    }  # fmt: skip
    rows = []
    try:
        for path in named.values():  # open channels, load caches
            await run_level(path, [[rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]] * 2, 2)
        for concurrency in args.concurrency:
            n = max(args.requests, concurrency)
            samples: dict[str, list[Sample]] = {name: [] for name in named}
            order = list(named)
            warm = [
                [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)] for _ in range(concurrency)
            ]
            await run_level(paths.direct, warm, concurrency)  # batch-size warm-up, untimed
            before = await paths.gateway_overhead()
            for _ in range(args.rounds):  # the order rotates per round
                for name in order:
                    # Fresh prompts for every path: shared ones would hit the prefix cache on every
                    # path but the first and make the later paths look faster.
                    prompts = [
                        [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)] for _ in range(n)
                    ]
                    samples[name] += await run_level(named[name], prompts, concurrency)
                order = order[1:] + order[:1]
            after = await paths.gateway_overhead()
            inside_ms = 1000 * (after[0] - before[0]) / max(1.0, after[1] - before[1])
            base = statistics.median(e for _, e in samples["direct"])
            for name, got in samples.items():
                ttft, e2e = [t for t, _ in got], [e for _, e in got]
                row = {
                    "concurrency": concurrency, "path": name, "requests": len(got),
                    "ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p99_ms": 1000 * pct(ttft, 0.99),
                    "e2e_p50_ms": 1000 * pct(e2e, 0.5), "e2e_p99_ms": 1000 * pct(e2e, 0.99),
                    "e2e_p50_vs_direct": statistics.median(e2e) / base,
                    "gateway_inside_ms": inside_ms if name != "direct" else 0.0,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"c={concurrency:<3} {name:<13} ttft p50 {row['ttft_p50_ms']:8.1f} ms  p99 {row['ttft_p99_ms']:8.1f} ms"
                    f"   e2e p50 {row['e2e_p50_ms']:8.1f} ms  p99 {row['e2e_p99_ms']:8.1f} ms"
                    f"   p50 / direct {row['e2e_p50_vs_direct']:.3f}",
                    flush=True,
                )
            print(
                f"c={concurrency:<3} time inside the gateway per request (its own metric): {inside_ms:.3f} ms"
            )
    finally:
        await paths.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="HF folder (default: the prepared demo model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=32, help="requests per path, level and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--worker-args", default="", help="extra decode worker flags, e.g. '--device cuda'")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    from scalellm.models.prepare import resolve_model_dir

    model = str(resolve_model_dir(args.model))
    worker_args = [
        "--role", "both", "--model", model, "--listen", "127.0.0.1:0", "--advertise-host", "127.0.0.1",
        "--transfer-listen", "127.0.0.1:0", "--max-num-seqs", str(max(args.concurrency)),
        *args.worker_args.split(),
    ]  # fmt: skip
    worker, ready = start("services.decode", worker_args)
    worker_address = ready.split()[1]
    http_port, grpc_port = free_port(), free_port()
    gateway_args = ["--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    gateway, _ = start("services.gateway", [*gateway_args, "--model", model, "--decode-addr", worker_address])
    try:
        rows = asyncio.run(bench(args, worker_address, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"))
    finally:
        for proc in (gateway, worker):
            proc.terminate()
            proc.wait(60)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
