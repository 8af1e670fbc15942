"""`scalellm bench`: load any OpenAI-compatible /v1/completions endpoint and report serving metrics.

    scalellm bench --base-url http://127.0.0.1:8000/v1 --max-concurrency 8 --num-prompts 32 \\
        --input-len 64 --output-len 32 --ignore-eos --slo-ttft-ms 500 --slo-tpot-ms 100 --out r.json
    scalellm bench --request-rate 4 --dataset prompts.jsonl    # Poisson arrivals, JSONL prompts
    scalellm bench --workload multi-turn --conversations 16 --turns 6 --system-len 1024 \\
        --turn-len 64 --output-len 64 --conversation-rate 1 --think-time-s 2 --ignore-eos
                                                        # TTFT per turn, prefix hits
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.serving.client import RunConfig, first_model, run
from bench.serving.metrics import SLO, format_summary, summarize
from bench.serving.multiturn import MultiTurnSpec, conversations, format_turns, per_turn, run_conversations
from bench.serving.workload import BenchRequest, dataset_requests, load_tokenizer, random_requests


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scalellm bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--base-url", default="http://127.0.0.1:8000/v1", help="endpoint up to /v1")
    add("--model", default=None, help="model name sent (default: the first one /v1/models lists)")
    add("--api-key", default=None)
    add("--num-prompts", type=int, default=32)
    add("--max-concurrency", type=int, default=None, help="streams open at once (default: no limit)")
    add("--request-rate", type=float, default=float("inf"), help="Poisson arrivals/s (default: all at once)")
    add("--input-len", type=int, default=64, help="random prompts: tokens per prompt")
    add("--output-len", type=int, default=None,
        help="max_tokens (dataset rows may override; default 32, multi-turn 64)")  # fmt: skip
    add("--dataset", default=None, help="JSONL with prompt and optional output_len per line")
    add("--tokenizer", default=None, help="model folder or tokenizer.json for random prompts "
        "(default: the prepared demo model if present; else random words)")  # fmt: skip
    add("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM extension)")
    add("--extra-body", default=None, help="JSON object merged into every request body")
    add("--slo-ttft-ms", type=float, default=None)
    add("--slo-tpot-ms", type=float, default=None)
    add("--slo-e2e-ms", type=float, default=None)
    add("--warmup", type=int, default=1, help="untimed requests first")
    add("--seed", type=int, default=0)
    add("--timeout-s", type=float, default=600.0, help="per-request limit")
    add("--no-progress", action="store_true")
    add("--out", default=None, help="write config, summary and per-request rows as JSON here")
    add(
        "--workload",
        choices=("random", "multi-turn"),
        default="random",
        help="multi-turn: conversations growing turn by turn (bench/serving/multiturn.py)",
    )
    mt = MultiTurnSpec()
    add("--conversations", type=int, default=mt.conversations, help="multi-turn: conversations")
    add("--turns", type=int, default=mt.turns, help="multi-turn: turns per conversation")
    add(
        "--system-prompts",
        type=int,
        default=mt.system_prompts,
        help="multi-turn: system prompts the conversations share",
    )
    add("--system-len", type=int, default=mt.system_len, help="multi-turn: tokens per system prompt")
    add("--turn-len", type=int, default=mt.turn_len, help="multi-turn: tokens per user message")
    add(
        "--conversation-rate",
        type=float,
        default=mt.arrival_rate,
        help="multi-turn: conversations started per second, Poisson (inf: all at once)",
    )
    add(
        "--think-time-s",
        type=float,
        default=mt.think_time_s,
        help="multi-turn: mean pause (exponential) between an answer and the next turn",
    )
    return p  # fmt: skip


def default_tokenizer() -> str | None:
    try:
        from scalellm.models.prepare import resolve_model_dir

        return str(resolve_model_dir(None))
    except Exception:  # not prepared, or no scalellm: random words instead
        return None


def make_requests(args: argparse.Namespace) -> list[BenchRequest]:
    args.output_len = args.output_len or 32
    if args.dataset:
        return dataset_requests(args.dataset, args.num_prompts, args.output_len, args.seed)
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer())
    return random_requests(args.num_prompts, args.input_len, args.output_len, tokenizer, args.seed)


async def bench_multi_turn(args: argparse.Namespace, config: RunConfig) -> dict[str, Any]:
    spec = MultiTurnSpec(
        conversations=args.conversations, turns=args.turns, system_prompts=args.system_prompts,
        system_len=args.system_len, turn_len=args.turn_len, output_len=args.output_len or MultiTurnSpec.output_len,
        arrival_rate=args.conversation_rate, think_time_s=args.think_time_s,
    )  # fmt: skip
    tokenizer = load_tokenizer(args.tokenizer or default_tokenizer())
    vocab = tokenizer.get_vocab_size() if tokenizer is not None else 32000
    if args.warmup:  # another seed: nothing of it is in the measured conversations
        warm = MultiTurnSpec(
            conversations=args.warmup,
            turns=1,
            system_len=16,
            turn_len=16,
            output_len=4,
            arrival_rate=float("inf"),
        )
        await run_conversations(config, warm, conversations(warm, vocab, seed=args.seed + 999), tokenizer)
    results, duration = await run_conversations(
        config, spec, conversations(spec, vocab, args.seed), tokenizer
    )
    summary = summarize([r.result for r in results], duration)
    turns = per_turn(results, spec.turns)
    print(format_summary(summary, f"{config.model} @ {config.base_url}, multi-turn"))
    print(format_turns(turns))
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
        "config": {**vars(args), "model": config.model, "request_rate": str(args.request_rate)},
        "summary": summary.to_dict(), "turns": turns,
        "requests": [
            {"conversation": r.conversation, "turn": r.turn, "ok": r.result.success, "error": r.result.error,
             "prompt_len": r.result.prompt_len, "cached_tokens": r.result.cached_tokens,
             "output_tokens": r.result.output_tokens, "ttft": r.result.ttft, "latency": r.result.latency}
            for r in results
        ],
    }  # fmt: skip


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    base_url = args.base_url.rstrip("/")
    model = args.model or await first_model(base_url, args.api_key)
    config = RunConfig(
        base_url=base_url, model=model, max_concurrency=args.max_concurrency,
        request_rate=args.request_rate, ignore_eos=args.ignore_eos,
        extra_body=json.loads(args.extra_body) if args.extra_body else {},
        api_key=args.api_key, timeout_s=args.timeout_s, seed=args.seed,
    )  # fmt: skip
    if args.workload == "multi-turn":
        return await bench_multi_turn(args, config)
    requests = make_requests(args)
    if args.warmup:
        await run(config, requests[: args.warmup], progress=False)
    results, duration = await run(config, requests, progress=not args.no_progress)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    summary = summarize(results, duration, slo)
    print(format_summary(summary, f"{model} @ {base_url}"))
    errors = sorted({r.error for r in results if not r.success})
    for error in errors[:5]:
        print("error:", error)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
        "config": {**vars(args), "model": model, "request_rate": str(args.request_rate)},
        "slo": asdict(slo), "summary": summary.to_dict(),
        "usage_reported": all(r.usage_reported for r in results if r.success),
        "requests": [
            {"ok": r.success, "error": r.error, "prompt_len": r.prompt_len, "output_tokens": r.output_tokens,
             "ttft": r.ttft, "latency": r.latency, "tpot": r.tpot, "itl": r.itl}
            for r in results
        ],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = asyncio.run(bench(args))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0 if report["summary"]["completed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
