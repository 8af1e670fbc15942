"""Speculative decoding by prompt lookup (engine/speculative.py) against plain decoding, offline.

    python bench/speculative.py                      # k = 0 2 4 6, batches 1 and 8, 3 repeats
    python bench/speculative.py --k 0 4 --batch 1 --repeats 1 --json out.json

Two workloads on the demo model (LLM.generate, EOS ignored, 64 output tokens; greedy, or with
--temperature seeded sampling, prompt i with seed i):
  repeating  prompts whose answers repeat what they hold (code to continue, a list to go on
             with, a passage to quote): what prompt lookup is for;
  random     random token ids (--random-tokens, 128), as `vllm bench serve`'s random dataset: the
             model's output repeats only what it repeats by itself (a longer prompt: more context
             for every row, a decode's and its drafts', to attend to).
For each k (0: off) and batch size B (the workload's prompts, cycled up to B of them, B at a time),
the median over --repeats of output tokens / wall time, and the share of drafts accepted. An
engine per k, built once, warmed up by one run; the repeats of every k interleaved. Every run's
tokens are checked equal to k = 0's (the bench stops otherwise; with --tolerate-mismatch it counts
the outputs that differ instead: on a GPU a step of several rows may run other matmul kernels than
a step of one, so bfloat16 tokens can part on near-ties).

    python bench/speculative.py --model M --device cuda --dtype bfloat16 --max-rows 64 --tolerate-mismatch
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scalellm import LLM, SamplingParams  # noqa: E402

REPEATING = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
    "    return a * b\n\n\ndef div(a, b):\n",
    "Monday: gym, work, dinner.\nTuesday: gym, work, dinner.\nWednesday: gym, work, dinner.\nThursday:",
    "Quote the first sentence of this text exactly. Text: The river rises in the northern hills and "
    "flows south for two hundred miles before it reaches the sea. Quote:",
    '<ul>\n  <li><a href="/home">Home</a></li>\n  <li><a href="/about">About</a></li>\n  <li><a href=',
]


def prompts_of(workload: str, tokenizer_encode, vocab: int, length: int = 128) -> list[list[int]]:  # type: ignore[no-untyped-def]
    if workload == "repeating":
        return [tokenizer_encode(p) for p in REPEATING]
    rng = random.Random(0)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(4)]


def run(
    llm: LLM, prompts: list[list[int]], batch: int, max_tokens: int, temperature: float = 0.0
) -> tuple[float, list[list[int]]]:
    """The prompts (cycled up to ``batch`` of them) ``batch`` at a time: output tokens / second.
    With a temperature, prompt i samples with seed i (the same tokens whatever k is)."""
    chosen = [prompts[i % len(prompts)] for i in range(max(batch, len(prompts)))]
    tokens = []
    start = time.perf_counter()
    for i in range(0, len(chosen), batch):
        params = [
            SamplingParams(temperature=temperature, seed=j, max_tokens=max_tokens, ignore_eos=True)
            for j in range(i, min(i + batch, len(chosen)))
        ]
        outs = llm.generate([{"prompt_token_ids": p} for p in chosen[i : i + batch]], params)
        tokens += [o.outputs[0].token_ids for o in outs]
    seconds = time.perf_counter() - start
    return sum(map(len, tokens)) / seconds, tokens


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[0, 2, 4, 6])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--workloads", nargs="+", default=["repeating", "random"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--random-tokens", type=int, default=128, help="the random workload's prompt length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling")
    ap.add_argument("--model", default=None, help="a model folder (default: the demo model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-rows", type=int, default=None, help="speculative_max_rows (default: the device's)")
    ap.add_argument("--kv-blocks", type=int, default=512, help="KV cache blocks of 16 tokens per engine")
    ap.add_argument(
        "--tolerate-mismatch", action="store_true", help="count outputs unlike k=0's, do not stop"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if 0 not in args.k:
        args.k = [0, *args.k]
    llms = {
        k: LLM(
            args.model,
            dtype=args.dtype,
            device=args.device,
            num_speculative_tokens=k,
            speculative_max_rows=args.max_rows,
            num_kv_blocks=args.kv_blocks,
        )
        for k in args.k
    }
    base = llms[0]
    vocab = base.engine.model_config.vocab_size
    results = []
    for workload in args.workloads:
        prompts = prompts_of(workload, lambda t: base.tokenizer.encode(t), vocab, args.random_tokens)
        for batch in args.batch:
            rates: dict[int, list[float]] = {k: [] for k in args.k}
            counts: dict[int, tuple[int, int]] = {}
            mismatched: dict[int, int] = dict.fromkeys(args.k, 0)
            expected = run(base, prompts, batch, args.max_tokens, args.temperature)[1]
            for llm in llms.values():
                run(llm, prompts, batch, args.max_tokens, args.temperature)  # warm-up
            for _ in range(args.repeats):
                for k, llm in llms.items():
                    drafter = llm.engine.drafter
                    before = (drafter.drafted, drafter.accepted) if drafter else (0, 0)
                    rate, tokens = run(llm, prompts, batch, args.max_tokens, args.temperature)
                    if tokens != expected and not args.tolerate_mismatch:
                        sys.exit(f"k={k} {workload} batch {batch}: tokens differ from k=0's")
                    mismatched[k] += sum(a != b for a, b in zip(tokens, expected, strict=True))
                    rates[k].append(rate)
                    after = (drafter.drafted, drafter.accepted) if drafter else (0, 0)
                    done = counts.get(k, (0, 0))
                    counts[k] = (done[0] + after[0] - before[0], done[1] + after[1] - before[1])
            plain = statistics.median(rates[0])
            for k in args.k:
                drafted, accepted = counts[k]
                row = {
                    "workload": workload,
                    "batch": batch,
                    "k": k,
                    "tok_s": statistics.median(rates[k]),
                    "runs": rates[k],
                    "speedup": statistics.median(rates[k]) / plain,
                    "drafted": drafted,
                    "accepted": accepted,
                    "acceptance": accepted / drafted if drafted else None,
                    "outputs_unlike_k0": mismatched[k],
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    machine = f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if base.engine.config.torch_device().type == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    print(f"\n{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {machine}, {args.dtype}, "
          f"{args.max_tokens} tokens at temperature {args.temperature}, median of {args.repeats}\n")  # fmt: skip
    print("| workload | batch | k | tok/s | vs k=0 | drafts accepted | outputs unlike k=0's |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%} of {r['drafted']}"
        print(
            f"| {r['workload']} | {r['batch']} | {r['k']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {acc} "
            f"| {r['outputs_unlike_k0']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
