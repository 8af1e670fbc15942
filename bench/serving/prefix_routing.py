"""Prefix routing against load routing, side by side, in two mesh shapes (issue 14).

For each shape (2 colocated workers; 2 prefill + 2 decode workers) and each routing (prefix,
load), starts `scalellm up` on the demo model, runs the multi-turn workload (conversations sharing
system prompts, the whole history each turn) and the single-turn random workload, and stops it.
The rounds rotate the order of the routings. Prints TTFT p50 per turn and overall, the prefix hit
rate and output throughput, and the prefix / load ratios (medians over the rounds).

    python -m bench.serving.prefix_routing --out /tmp/prefix.json --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.serving.client import RunConfig, first_model, run
from bench.serving.metrics import summarize
from bench.serving.multiturn import MultiTurnSpec, conversations, per_turn, run_conversations
from bench.serving.run_all import free_port
from bench.serving.systems import Running, mesh
from bench.serving.workload import load_tokenizer, random_requests

ROUTE_METRICS = {
    "scalellm_gateway_routes": "sequences",
    "scalellm_gateway_route_prompt_tokens": "prompt_tokens",
    "scalellm_gateway_route_cached_tokens": "cached_tokens",
}
SHAPES = {"colocated-2": ["--colocated", "--decode", "2"], "disagg-2+2": ["--prefill", "2", "--decode", "2"]}


async def measure(base_url: str, args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    model = await first_model(base_url)
    config = RunConfig(base_url, model, max_concurrency=args.concurrency, ignore_eos=True)
    spec = MultiTurnSpec(
        conversations=args.conversations, turns=args.turns, system_prompts=args.system_prompts,
        system_len=args.system_len, turn_len=args.turn_len, output_len=args.output_len,
        arrival_rate=args.conversation_rate, think_time_s=args.think_time_s,
    )  # fmt: skip
    vocab = tokenizer.get_vocab_size()
    warm = MultiTurnSpec(
        conversations=2, turns=1, system_len=16, turn_len=16, output_len=4, arrival_rate=float("inf")
    )
    await run_conversations(config, warm, conversations(warm, vocab, seed=999), tokenizer)
    before = await route_counts(base_url)
    results, duration = await run_conversations(config, spec, conversations(spec, vocab, seed=0), tokenizer)
    after = await route_counts(base_url)
    multi = summarize([r.result for r in results], duration)
    single_requests = random_requests(args.random_prompts, args.random_input_len, args.output_len, tokenizer)
    single_config = RunConfig(base_url, model, max_concurrency=args.random_concurrency, ignore_eos=True)
    single_results, single_duration = await run(single_config, single_requests, progress=False)
    single = summarize(single_results, single_duration)
    return {
        "multi_turn": multi.to_dict(),
        "turns": per_turn(results, spec.turns),
        "random": single.to_dict(),
        "routes": [
            {"worker": w, "prefill": p, **{k: v - before.get((w, p), {}).get(k, 0.0) for k, v in c.items()}}
            for (w, p), c in sorted(after.items())
        ],
        "requests": [
            {
                "conversation": r.conversation,
                "turn": r.turn,
                "ok": r.result.success,
                "prompt_len": r.result.prompt_len,
                "cached_tokens": r.result.cached_tokens,
                "ttft": r.result.ttft,
                "latency": r.result.latency,
            }
            for r in results
        ],
    }


async def route_counts(base_url: str) -> dict[tuple[str, str], dict[str, float]]:
    """The gateway's routing counters (/metrics) by (worker computing the prompt, local|remote)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url.removesuffix("/v1") + "/metrics") as r,
    ):
        text = await r.text()
    counts: dict[tuple[str, str], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ROUTE_METRICS:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["worker"], sample.labels["prefill"])
                counts.setdefault(key, {})[ROUTE_METRICS[family.name]] = sample.value
    return counts


def report(runs: list[dict[str, Any]]) -> str:
    lines = []
    for shape in SHAPES:
        by = {r: [x for x in runs if x["shape"] == shape and x["routing"] == r] for r in ("prefix", "load")}
        if not all(by.values()):
            continue

        def med(routing: str, key: Any, by: dict[str, list[dict[str, Any]]] = by) -> float:
            return statistics.median(key(x) for x in by[routing])

        lines.append(f"## {shape} ({len(by['prefix'])} round(s); medians)")
        lines.append("| routing | multi-turn TTFT p50 ms | per turn p50 ms | hit rate | random out tok/s |")
        lines.append("|---|---|---|---|---|")
        for routing in ("prefix", "load"):
            ttft = med(routing, lambda x: x["multi_turn"]["ttft"]["median_ms"])
            turns = " / ".join(
                f"{med(routing, lambda x, t=t: x['turns'][t]['ttft_median_ms']):.0f}"
                for t in range(len(by[routing][0]["turns"]))
            )
            hit = med(
                routing,
                lambda x: (
                    x["multi_turn"]["total_cached_tokens"] / max(1, x["multi_turn"]["total_input_tokens"])
                ),
            )
            out = med(routing, lambda x: x["random"]["output_throughput"])
            lines.append(f"| {routing} | {ttft:.0f} | {turns} | {hit:.1%} | {out:.1f} |")
        ratio_ttft = med("load", lambda x: x["multi_turn"]["ttft"]["median_ms"]) / med(
            "prefix", lambda x: x["multi_turn"]["ttft"]["median_ms"]
        )
        ratio_out = med("prefix", lambda x: x["random"]["output_throughput"]) / med(
            "load", lambda x: x["random"]["output_throughput"]
        )
        lines.append(
            f"load / prefix multi-turn TTFT p50: {ratio_ttft:.2f}x; prefix / load random output: {ratio_out:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model", default=None, help="model folder (default: the prepared demo model)")
    add("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    add("--rounds", type=int, default=1)
    mt = MultiTurnSpec()
    add("--concurrency", type=int, default=None, help="streams open at once (default: no limit)")
    add("--conversations", type=int, default=mt.conversations)
    add("--turns", type=int, default=mt.turns)
    add("--system-prompts", type=int, default=mt.system_prompts)
    add("--system-len", type=int, default=mt.system_len)
    add("--turn-len", type=int, default=mt.turn_len)
    add("--output-len", type=int, default=mt.output_len)
    add("--conversation-rate", type=float, default=mt.arrival_rate, help="conversations started per second")
    add("--think-time-s", type=float, default=mt.think_time_s, help="mean pause before a next turn")
    add("--random-prompts", type=int, default=16)
    add("--random-input-len", type=int, default=128)
    add("--random-concurrency", type=int, default=8)
    add("--threads-per-worker", type=int, default=1)
    add("--worker-arg", action="append", default=[], help="extra worker flag (--worker-arg=--flag=value)")
    add("--gateway-arg", action="append", default=[], help="extra gateway flag (--gateway-arg=--flag=value)")
    add("--routings", nargs="+", default=["prefix", "load"], choices=["prefix", "load"])
    add("--out", default=None)
    add("--logs", default="/tmp/prefix-routing-logs")
    args = p.parse_args(argv)

    from scalellm.models.prepare import resolve_model_dir

    model = str(resolve_model_dir(args.model))
    tokenizer = load_tokenizer(model)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for shape in args.shapes:
            for routing in args.routings if round_ % 2 == 0 else args.routings[::-1]:
                extra = [f"--threads-per-worker={args.threads_per_worker}", f"--gateway-arg=--routing={routing}",
                         *(f"--worker-arg={a}" for a in args.worker_arg),
                         *(f"--gateway-arg={a}" for a in args.gateway_arg)]  # fmt: skip
                system = mesh(f"{shape}-{routing}", SHAPES[shape], model, free_port(), extra)
                started = time.strftime("%H:%M:%S")
                load_before = os.getloadavg()[0]
                with Running(system, Path(args.logs) / f"{shape}-{routing}-{round_}.log") as base_url:
                    result = asyncio.run(measure(base_url, args, tokenizer))
                runs.append({"shape": shape, "routing": routing, "round": round_, "started": started,
                             "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0], **result})  # fmt: skip
                print(f"{shape} {routing} round {round_}: multi-turn TTFT p50 "
                      f"{result['multi_turn']['ttft']['median_ms']:.0f} ms, random out "
                      f"{result['random']['output_throughput']:.1f} tok/s", flush=True)  # fmt: skip
    print(report(runs))
    if args.out:
        record = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
                  "cpus": os.cpu_count(), "args": vars(args), "runs": runs}  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
