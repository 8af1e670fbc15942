"""One tenant floods the mesh; how long does another tenant wait for its first token?

    python -m bench.tenant_fairness [--flood 256] [--probes 12] [--max-num-seqs 16] [--out FILE]

Starts `scalellm up --colocated --decode 1` on the demo model with three API keys (flood,
victim: their own tenants; shared: a second key of the flood tenant), then measures, in one run:

    idle     the victim's TTFT, its requests one after another (random pauses between them,
             --probe-gap-s) on an idle mesh
    fair     the same while the flood tenant keeps --flood streams open (each one re-sent as it
             ends), the victim on its own tenant: the fair queues serve it on its turn
    unfair   the same flood, the victim's requests sent with the flood tenant's key: one tenant,
             FCFS behind the flood (what the mesh did before tenants had shares)

and prints the medians and the ratios fair / idle and unfair / idle as JSON. TTFT is what the
client sees: from sending the request to the first streamed text; beside it the worker's own
account of the first token (queue: waiting in the engine for a slot, prefill). Issue 15's bar:
fair / idle within 3x. The flood's requests are short prompts with --flood-tokens tokens each (ignore_eos),
sent by a client process of their own (as another tenant's clients would be), so the victim's
client does not share an event loop with the flood's 256 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bench.serving.client import RunConfig, send
from bench.serving.sse import SSEParser
from bench.serving.workload import BenchRequest

MODEL = "SmolLM2-135M-Instruct"
KEYS = "sk-flood flood\nsk-shared flood\nsk-victim victim\n"


class EventLike(Protocol):
    def is_set(self) -> bool: ...

    def set(self) -> None: ...


class Mesh:
    """`python -m scalellm up` as a child process, its output collected."""

    def __init__(self, keys: Path, max_num_seqs: int) -> None:
        argv = [
            sys.executable, "-m", "scalellm", "up", "--colocated", "--decode", "1", "--http-port", "0",
            "--grpc-port", "0", "--quiet", "--max-num-seqs", str(max_num_seqs), "--num-kv-blocks", "4096",
            f"--gateway-arg=--api-keys-file={keys}", "--gateway-arg=--max-inflight=4096",
        ]  # fmt: skip
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def base_url(self, timeout_s: float = 300.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = [line for line in self.lines if line.startswith("mesh ready: ")]
            if ready:
                return ready[0].split()[2]
            if self.proc.poll() is not None:
                raise RuntimeError("scalellm up exited:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.2)
        raise RuntimeError("the mesh did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def probe(session: aiohttp.ClientSession, base_url: str, key: str, i: int) -> dict[str, float]:
    """One victim request (streamed): the client's TTFT, and where the worker says the time went
    until the first token (queue: waiting in the engine for a slot; prefill) from the timings the
    gateway adds on request (x-scalellm-timings)."""
    body = {
        "model": MODEL, "prompt": f"Question {i}: what is the capital of Spain?", "max_tokens": 8,
        "temperature": 0.0, "stream": True, "ignore_eos": True,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {key}", "x-scalellm-timings": "1"}
    parser, ttft = SSEParser(), 0.0
    timings: dict[str, float] = {}
    start = time.perf_counter()
    async with session.post(f"{base_url}/completions", json=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"probe failed: HTTP {response.status} {await response.text()}")
        async for raw in response.content.iter_any():
            for data in parser.feed(raw):
                if data.strip() == "[DONE]":
                    continue
                choice = (json.loads(data).get("choices") or [{}])[0]
                if choice.get("text") and not ttft:
                    ttft = time.perf_counter() - start
                timings = choice.get("timings") or timings
    return {"ttft": ttft, "queue": timings.get("queue", 0.0), "prefill": timings.get("prefill", 0.0)}


async def probe_ttfts(
    session: aiohttp.ClientSession, base_url: str, key: str, probes: int, gap_s: float = 0.0, seed: int = 0
) -> dict[str, Any]:
    """The victim's requests, one after another, each after a pause drawn uniformly from
    [0, gap_s]: their TTFTs and worker queue times, and medians. Without the pause a request
    would be sent the moment the previous one finished, which is a step boundary of the busy
    worker: every probe would arrive just after a step began and wait for all of it."""
    rng = random.Random(seed)
    results = []
    for i in range(probes):
        await asyncio.sleep(rng.uniform(0.0, gap_s))
        results.append(await probe(session, base_url, key, i))
    out: dict[str, Any] = {f"{k}_s": [r[k] for r in results] for k in ("ttft", "queue", "prefill")}
    return out | {
        f"{k}_p50_s": statistics.median(r[k] for r in results) for k in ("ttft", "queue", "prefill")
    }


async def flood(
    base_url: str, streams: int, tokens: int, stop: EventLike, ready: EventLike | None = None
) -> int:
    """Keep `streams` requests of the flood tenant open until stop is set (ready: set once they
    are sent); how many finished."""
    config = RunConfig(base_url=base_url, model=MODEL, api_key="sk-flood", ignore_eos=True)
    done = 0

    async def loop(k: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        i = 0
        while not stop.is_set():
            await send(session, config, BenchRequest(f"Flood {k}.{i}: tell me a story about", 8, tokens))
            done += 1
            i += 1

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        tasks = [asyncio.create_task(loop(k, session)) for k in range(streams)]
        await asyncio.sleep(0)
        if ready is not None:
            ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return done


def flood_process(
    base_url: str, streams: int, tokens: int, stop: EventLike, ready: EventLike, finished: Any
) -> None:
    """The flood tenant as its own client process (a multiprocessing target): its 256 streams
    must not share the victim's event loop, or the victim's TTFT measures the client's own lag."""
    finished.value = asyncio.run(flood(base_url, streams, tokens, stop, ready))


async def under_flood(base_url: str, key: str, probes: int, args: argparse.Namespace) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    stop, ready, finished = context.Event(), context.Event(), context.Value("i", 0)
    flooder = context.Process(
        target=flood_process,
        args=(base_url, args.flood, args.flood_tokens, stop, ready, finished),
        daemon=True,
    )
    flooder.start()
    try:
        if not await asyncio.to_thread(ready.wait, 120):
            raise RuntimeError("the flood client did not start")
        await asyncio.sleep(args.warmup_s)  # the flood's streams are all queued or running by now
        started = time.perf_counter()
        async with aiohttp.ClientSession() as session:
            probed = await probe_ttfts(session, base_url, key, probes, args.probe_gap_s)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        flooder.join(120)
        if flooder.is_alive():
            flooder.kill()
    return probed | {"flood_finished": finished.value, "seconds": seconds}


async def measure(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        await probe_ttfts(session, base_url, "sk-victim", 3)  # warm up
        idle = await probe_ttfts(session, base_url, "sk-victim", args.probes, args.probe_gap_s)
    fair = await under_flood(base_url, "sk-victim", args.probes, args)
    unfair = await under_flood(base_url, "sk-shared", args.unfair_probes, args)
    return {
        "idle": idle,
        "fair": fair,
        "unfair": unfair,
        "fair_over_idle": fair["ttft_p50_s"] / idle["ttft_p50_s"],
        "unfair_over_idle": unfair["ttft_p50_s"] / idle["ttft_p50_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flood", type=int, default=256, help="flood streams kept open")
    parser.add_argument("--flood-tokens", type=int, default=32, help="tokens per flood request")
    parser.add_argument("--probes", type=int, default=12, help="victim requests per phase")
    parser.add_argument(
        "--unfair-probes", type=int, default=3, help="victim requests behind the flood (each waits for it)"
    )
    parser.add_argument(
        "--probe-gap-s", type=float, default=0.2, help="victim pauses drawn from [0, this] between requests"
    )
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the worker's running batch")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="flood time before probing")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        keys.write_text(KEYS)
        keys.chmod(0o600)
        mesh = Mesh(keys, args.max_num_seqs)
        try:
            result = asyncio.run(measure(mesh.base_url(), args))
        finally:
            mesh.stop()
    result["conditions"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus ({platform.processor() or platform.platform()})",
        **{k: v for k, v in vars(args).items() if k != "out"},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with contextlib.suppress(OSError):
            Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
