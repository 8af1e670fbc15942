"""The gateway's own cost: the same streams through the gateway and straight to the decode worker.

Starts a colocated decode worker on the model (default: the prepared demo model) and a gateway
pointing at it (static --decode-addr), then, at each concurrency level, runs greedy requests of the
same shape (fresh random prompts for every path, so the prefix cache favours none; fixed lengths;
ignore_eos) several ways, interleaved round by round so that drift hits them alike:

  direct          gRPC DecodeWorker.Generate on the worker, one call per request
  direct-session  gRPC DecodeWorker.Session on the worker, every request on one stream (the
                  protocol the gateway itself uses to reach the worker)
  gateway-grpc    gRPC Gateway.Generate on the gateway
  gateway-http    POST /v1/completions with "stream": true (SSE) on the gateway

and reports TTFT and end-to-end latency (p50, p99; the end is the message or SSE event that carries
the finish reason, on every path), each gateway path's difference to direct (and to direct-session when it ran)
at p50, with a 95% bootstrap interval, p99 and mean, and the gateway's own time per request: the
`gateway` timing it returns with every answer (routing and dispatch plus its processing of each
worker message), p50 and p99.

Three ways of loading it:

  --mode burst   (default) each round sends max(--requests, concurrency) requests with
                 `concurrency` streams open: at 64 streams the first 64 arrive at once, so the
                 median request waits behind the others' tokenization and dispatch.
  --mode steady  closed loop: each of the `concurrency` streams sends --warmup requests that are
                 not counted, then --requests counted ones, each as soon as its previous one
                 ended (concurrency x --requests samples per path, level and round).
  --mode paired  steady, but each gateway path runs at the same time as `concurrency` direct
                 streams (the worker batches both, 2 x concurrency): both see the same steps, so
                 their difference is the gateway's hop and not the model's drift between phases.
                 The direct rows are named after their partner (direct/gateway-grpc).

--model tiny serves a tiny random Llama (3 layers, width 64) with the demo model's tokenizer and
vocabulary, built once into the model cache: a step takes milliseconds even on a CPU, so tokens
come at a GPU-like rate (which loads the gateway harder than a real model on a CPU does) and the
model's run-to-run spread no longer hides milliseconds.

    python bench/gateway_overhead.py [--model tiny|FOLDER] [--mode burst|steady|paired]
        [--concurrency 1 8 32 64] [--requests 32] [--warmup 4] [--rounds 2] [--max-tokens 16]
        [--pin WORKER:GATEWAY:CLIENT] [--paths direct direct-session gateway-grpc gateway-http]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
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

from scalellm.launcher.child import exec_argv  # noqa: E402
from scalellm.lifecycle import ReadyLine  # noqa: E402
from scalellm.redis_server import free_port  # noqa: E402
from scalellm.security import SecurityConfig  # noqa: E402
from scalellm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402
from services.gateway.session import WorkerSession  # noqa: E402

# (ttft, e2e, the gateway's own time, messages or SSE events received, the worker's stream as the
#  gateway saw it (worker_call); the gateway's two are nan on the direct path)
Sample = tuple[float, float, float, int, float]
Path_ = Callable[[list[int]], Awaitable[Sample]]


def tiny_model(demo: Path) -> Path:
    """A tiny random Llama with demo's vocabulary and tokenizer files, built once next to demo."""
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    target = demo.parent / f"bench-tiny-llama-{vocab}"
    if (target / "model.safetensors").is_file():
        return target
    from tests.tiny_models import build_tiny_chat_model

    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_chat_model(demo, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def start(
    module: str, args: list[str], cpus: set[int] | None = None
) -> tuple[subprocess.Popen[str], ReadyLine]:
    """Run `python -m module args` (on cpus only, if given); return the process and its READY line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(  # pinned before exec, and no fork of this gRPC client (launcher/exec_child.py)
        exec_argv([sys.executable, "-m", module, *args], sorted(cpus or ())),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if (ready := ReadyLine.parse(line)) is not None:
            return proc, ready
    raise RuntimeError(f"{module} exited before it was ready")


class Paths:
    """The three ways of running one request; each returns (ttft, e2e, gateway's own time)."""

    def __init__(self, worker: str, gw_grpc: str, gw_http: str, max_tokens: int) -> None:
        self.sampling = common_pb2.SamplingParams(
            temperature=0, top_p=1.0, max_tokens=max_tokens, ignore_eos=True
        )  # exactly what the gateway sends
        self.max_tokens = max_tokens
        # With SCALELLM_MESH_TOKEN set, the worker and gateway this bench starts inherit it, and
        # the direct paths must carry it too (as the gateway does: once per Session stream).
        self.mesh = SecurityConfig.from_env().load()
        self.worker_channel = self.mesh.channel(worker)
        self.gateway_channel = grpc.aio.insecure_channel(gw_grpc)
        self.worker = worker_pb2_grpc.DecodeWorkerStub(self.worker_channel)
        self.worker_session = WorkerSession(self.worker, worker, self.mesh.metadata)
        self.gateway = gateway_pb2_grpc.GatewayStub(self.gateway_channel)
        self.http_url = f"http://{gw_http}/v1/completions"
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def _stream(self, call: grpc.aio.UnaryStreamCall) -> Sample:
        start, ttft, tokens, inside, messages = time.perf_counter(), None, 0, float("nan"), 0
        worker_call = float("nan")
        end = None
        async for message in call:
            messages += 1
            if message.token_ids:
                tokens += len(message.token_ids)
                if ttft is None:
                    ttft = time.perf_counter() - start
            if message.finish_reason:  # the answer is complete; the call's status follows
                end = time.perf_counter() - start
            if message.HasField("timings") and message.timings.gateway:
                inside, worker_call = message.timings.gateway, message.timings.worker_call
        assert tokens == self.max_tokens, f"{tokens} tokens, expected {self.max_tokens}"
        return ttft or 0.0, end or time.perf_counter() - start, inside, messages, worker_call

    async def direct(self, prompt: list[int]) -> Sample:
        request = worker_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=prompt, sampling=self.sampling
        )
        return await self._stream(self.worker.Generate(request, metadata=self.mesh.metadata))

    async def direct_session(self, prompt: list[int]) -> Sample:
        """The worker's Session rpc, as the gateway calls it (every stream of the bench on one)."""
        request = worker_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex, prompt_token_ids=prompt, sampling=self.sampling
        )
        start, ttft, tokens, messages = time.perf_counter(), None, 0, 0
        call = self.worker_session.start(request, start + 600.0)
        while (message := await call.read()) is not None:
            messages += 1
            tokens += len(message.token_ids)
            if ttft is None and message.token_ids:
                ttft = time.perf_counter() - start
        assert tokens == self.max_tokens, f"{tokens} tokens, expected {self.max_tokens}"
        return ttft or 0.0, time.perf_counter() - start, float("nan"), messages, float("nan")

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
        start, ttft, inside, events, worker_call = time.perf_counter(), None, float("nan"), 0, float("nan")
        end = None
        headers = {"x-scalellm-timings": "1"}
        async with self.session.post(self.http_url, json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data: {"):
                    events += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
                if b'"timings"' in line:  # the event with the finish reason: the answer is complete
                    end = time.perf_counter() - start
                    t = json.loads(line[6:])["choices"][0]["timings"]
                    inside, worker_call = t["gateway"], t["worker_call"]
        return ttft or 0.0, end or time.perf_counter() - start, inside, events, worker_call

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
        await self.worker_session.close()
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


async def run_steady(
    path: Path_, prompt: Callable[[], list[int]], concurrency: int, warmup: int, count: int
) -> list[Sample]:
    """Closed loop: `concurrency` streams, each `warmup` uncounted requests then `count` counted."""
    samples: list[Sample] = []

    async def client() -> None:
        for i in range(warmup + count):
            sample = await path(prompt())
            if i >= warmup:
                samples.append(sample)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def p50_difference_ci(a: list[float], b: list[float], draws: int = 1000) -> tuple[float, float]:
    """95% bootstrap interval of median(a) - median(b): how far the measured difference could move
    by chance alone, given each path's own spread (independent resampling of both)."""
    rng = random.Random(1)
    diffs = sorted(
        statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
        for _ in range(draws)
    )
    return diffs[int(0.025 * draws)], diffs[int(0.975 * draws)]


async def bench(
    args: argparse.Namespace, worker: str, gw_grpc: str, gw_http: str, pids: dict[str, int]
) -> list[dict[str, float]]:
    paths = Paths(worker, gw_grpc, gw_http, args.max_tokens)
    rng = random.Random(0)

    def prompt() -> list[int]:
        # Fresh prompts for every request: shared ones would hit the prefix cache on every path but
        # the first and make the later paths look faster.
        return [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]

    every: dict[str, Path_] = {
        "direct": paths.direct, "direct-session": paths.direct_session,
        "gateway-grpc": paths.gateway_grpc, "gateway-http": paths.gateway_http,
    }  # fmt: skip
    named = {name: every[name] for name in args.paths}
    if args.mode == "paired":  # each gateway path with its own direct partner, run together
        phases = [[name, f"direct/{name}"] for name in named if name != "direct"]
        named |= {f"direct/{name}": paths.direct for name in named if name != "direct"}
        named.pop("direct", None)
    else:
        phases = [[name] for name in named]
    rows = []
    try:
        for path in named.values():  # open channels, load caches
            await run_level(path, [prompt(), prompt()], 2)
        for concurrency in args.concurrency:
            n = max(args.requests, concurrency)
            samples: dict[str, list[Sample]] = {name: [] for name in named}
            cpu: dict[str, dict[str, float]] = {name: dict.fromkeys(pids, 0.0) for name in named}
            order = list(phases)
            await run_level(paths.direct, [prompt() for _ in range(concurrency)], concurrency)  # warm-up
            before = await paths.gateway_overhead()
            for _ in range(args.rounds):  # the order rotates per round
                for phase in order:
                    used = {proc: cpu_seconds(pid) for proc, pid in pids.items()}
                    if args.mode == "burst":
                        runs = [
                            run_level(named[name], [prompt() for _ in range(n)], concurrency)
                            for name in phase
                        ]
                    else:
                        runs = [
                            run_steady(named[name], prompt, concurrency, args.warmup, args.requests)
                            for name in phase
                        ]
                    for name, got in zip(phase, await asyncio.gather(*runs), strict=True):
                        samples[name] += got
                    for proc, pid in pids.items():  # a paired phase's CPU goes to its gateway path
                        cpu[phase[0]][proc] += cpu_seconds(pid) - used[proc]
                order = order[1:] + order[:1]
            after = await paths.gateway_overhead()
            mean_inside_ms = 1000 * (after[0] - before[0]) / max(1.0, after[1] - before[1])
            for name, got in samples.items():
                nan = float("nan")
                base = samples.get(f"direct/{name}") or samples.get("direct") or [(0.0, nan, 0.0, 0, nan)]
                direct_e2e = [s[1] for s in base]
                base50, base99 = pct(direct_e2e, 0.5), pct(direct_e2e, 0.99)
                ttft, e2e = [s[0] for s in got], [s[1] for s in got]
                session_e2e = [s[1] for s in samples.get("direct-session", [])] or [nan]
                # The hop: what this request's client waited beyond the gateway's own call to the
                # worker (accepting the call, all before dispatch, passing the last message on).
                # Measured within each request, so free of the step quantization that moves e2e.
                hop = [s[1] - s[4] for s in got if s[4] == s[4]] or [nan]
                worker_call = [s[4] for s in got if s[4] == s[4]] or [nan]
                inside = [s[2] for s in got if s[2] == s[2]] or [0.0]
                row = {
                    "concurrency": concurrency, "path": name, "requests": len(got),
                    "ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p99_ms": 1000 * pct(ttft, 0.99),
                    "e2e_p50_ms": 1000 * pct(e2e, 0.5), "e2e_p99_ms": 1000 * pct(e2e, 0.99),
                    "e2e_p50_minus_direct_ms": 1000 * (pct(e2e, 0.5) - base50),
                    "e2e_p99_minus_direct_ms": 1000 * (pct(e2e, 0.99) - base99),
                    "e2e_p50_vs_direct": statistics.median(e2e) / statistics.median(direct_e2e),
                    "e2e_mean_minus_direct_ms": 1000 * (statistics.mean(e2e) - statistics.mean(direct_e2e)),
                    "e2e_p50_minus_direct_ci95_ms": [1000 * x for x in p50_difference_ci(e2e, direct_e2e)]
                    if not name.startswith("direct") and direct_e2e[0] == direct_e2e[0] else [nan, nan],
                    "e2e_p50_minus_direct_session_ms": 1000 * (pct(e2e, 0.5) - pct(session_e2e, 0.5)),
                    "hop_p50_ms": 1000 * pct(hop, 0.5), "hop_p99_ms": 1000 * pct(hop, 0.99),
                    "worker_call_p50_minus_direct_ms": 1000 * (pct(worker_call, 0.5) - base50),
                    "gateway_p50_ms": 1000 * pct(inside, 0.5), "gateway_p99_ms": 1000 * pct(inside, 0.99),
                    "messages_per_request": statistics.mean(s[3] for s in got),
                }  # fmt: skip
                # CPU per request, warm-up requests included (steady mode runs them in the window).
                per = len(got) * (1 + args.warmup / args.requests if args.mode != "burst" else 1)
                for proc in pids:
                    row[f"{proc}_cpu_ms_per_request"] = 1000 * cpu[name][proc] / per
                rows.append(row | {"samples": [list(sample) for sample in got]} if args.json else row)
                line = (
                    f"c={concurrency:<3} {name:<19} n={len(got):<5} ttft p50 {row['ttft_p50_ms']:8.1f}"
                    f" p99 {row['ttft_p99_ms']:8.1f}   e2e p50 {row['e2e_p50_ms']:8.1f}"
                    f" p99 {row['e2e_p99_ms']:8.1f} ms"
                )
                if not name.startswith("direct"):
                    low, high = row["e2e_p50_minus_direct_ci95_ms"]
                    line += (
                        f"   vs direct: e2e p50 {row['e2e_p50_minus_direct_ms']:+7.2f}"
                        f" (95% CI {low:+.1f}..{high:+.1f})"
                        f" p99 {row['e2e_p99_minus_direct_ms']:+7.2f} mean {row['e2e_mean_minus_direct_ms']:+7.2f} ms"
                        f"   vs direct-session: e2e p50 {row['e2e_p50_minus_direct_session_ms']:+7.2f} ms"
                        f"   hop p50 {row['hop_p50_ms']:6.2f} p99 {row['hop_p99_ms']:6.2f} ms"
                        f" (its worker call vs direct p50 {row['worker_call_p50_minus_direct_ms']:+6.2f} ms)"
                        f"   gateway's own p50 {row['gateway_p50_ms']:6.3f} p99 {row['gateway_p99_ms']:6.3f} ms"
                    )
                line += f"   msgs/req {row['messages_per_request']:.1f}"
                if not name.startswith("direct/"):
                    line += "   cpu ms/req " + " ".join(
                        f"{proc} {row[f'{proc}_cpu_ms_per_request']:.2f}" for proc in pids
                    )
                print(line, flush=True)
            print(
                f"c={concurrency:<3} mean time inside the gateway per request (its metric): "
                f"{mean_inside_ms:.3f} ms",
                flush=True,
            )
    finally:
        await paths.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="HF folder, or 'tiny' (default: the prepared demo model)"
    )
    parser.add_argument("--mode", choices=("burst", "steady", "paired"), default="burst")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--requests", type=int, default=32,
        help="burst: requests per path, level and round; steady: counted requests per stream",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=4, help="steady: uncounted requests per stream first")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument(
        "--paths", nargs="+", choices=("direct", "direct-session", "gateway-grpc", "gateway-http"),
        default=["direct", "direct-session", "gateway-grpc", "gateway-http"], help="which paths to run (e.g. to profile one)",
    )  # fmt: skip
    parser.add_argument("--worker-args", default="", help="extra decode worker flags, e.g. '--device cuda'")
    parser.add_argument("--gateway-args", default="", help="extra gateway flags")
    parser.add_argument(
        "--pin", default="",
        help="WORKER:GATEWAY:CLIENT cpu lists (Linux), e.g. '0:1:1' keeps the gateway off the model's core",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the rows here, each request's sample too")
    args = parser.parse_args(argv)
    if args.mode == "paired" and args.paths == ["direct"]:
        parser.error("--mode paired needs a gateway path")

    from scalellm.models.prepare import resolve_model_dir

    tiny = args.model == "tiny"
    model = str(tiny_model(resolve_model_dir(None)) if tiny else resolve_model_dir(args.model))
    worker_args = [
        "--role", "both", "--model", model, "--listen", "127.0.0.1:0", "--advertise-host", "127.0.0.1",
        "--transfer-listen", "127.0.0.1:0", "--max-num-seqs", str(max(args.concurrency) * (2 if args.mode == "paired" else 1)),
        *(["--num-kv-blocks", "1024"] if tiny else []),
        *args.worker_args.split(),
    ]  # fmt: skip
    pins = (
        [{int(c) for c in part.split(",")} if part else None for part in args.pin.split(":")]
        if args.pin
        else []
    )
    worker_cpus, gateway_cpus, client_cpus = [*pins, None, None, None][:3]
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    worker, ready = start("services.decode", worker_args, worker_cpus)
    worker_address = ready.address
    http_port, grpc_port = free_port(), free_port()
    gateway_args = ["--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    gateway, _ = start(
        "services.gateway",
        [*gateway_args, "--model", model, "--decode-addr", worker_address, *args.gateway_args.split()],
        gateway_cpus,
    )
    print(f"model {model}; worker pid {worker.pid}, gateway pid {gateway.pid}", flush=True)
    try:
        pids = {"gateway": gateway.pid, "worker": worker.pid, "client": os.getpid()}
        gw_grpc, gw_http = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
        rows = asyncio.run(bench(args, worker_address, gw_grpc, gw_http, pids))
    finally:
        for proc in (gateway, worker):
            proc.terminate()
            proc.wait(60)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
