"""Side by side: the transformers baseline, the mesh colocated and disaggregated (and llama.cpp).

Starts each system itself, runs every concurrency level with the same seeded random prompts
(greedy, EOS ignored), stops it, and writes one JSON; then prints the tables and draws the plot.

    python -m bench.serving.run_all --out /tmp/serving.json --plot docs/serving_throughput_ttft.png
    python -m bench.serving.run_all --systems hf-baseline mesh-colocated --concurrency 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.serving.client import RunConfig, first_model, run
from bench.serving.metrics import summarize
from bench.serving.systems import Running, System, baseline, llama_cpp, mesh
from bench.serving.workload import load_tokenizer, random_requests
from scalellm.redis_server import free_port

ALL = ("hf-baseline", "mesh-colocated", "mesh-disaggregated", "llama.cpp")


def requests_for(concurrency: int, cap: int) -> int:
    return min(cap, 64, max(8, 2 * concurrency))


def make_systems(args: argparse.Namespace, model: str) -> list[System]:
    threads = args.threads or len(os.sched_getaffinity(0))
    extra = [f"--threads-per-worker={args.threads}"] if args.threads else []
    made = {
        "hf-baseline": lambda: baseline(model, free_port(), threads, args.baseline_max_requests),
        "mesh-colocated": lambda: mesh("mesh-colocated", ["--colocated", "--decode", "1"], model,
                                       free_port(), extra),
        "mesh-disaggregated": lambda: mesh("mesh-disaggregated", ["--prefill", "1", "--decode", "1"], model,
                                           free_port(), extra),
        "llama.cpp": lambda: llama_cpp(args.llamacpp_python, args.gguf, free_port(), threads,
                                       args.eos_ids, args.baseline_max_requests),
    }  # fmt: skip
    return [made[name]() for name in args.systems]


async def measure(system: System, base_url: str, args: argparse.Namespace, tokenizer: Any) -> list[dict]:
    model = await first_model(base_url)
    config = RunConfig(base_url, model, ignore_eos=system.ignore_eos, extra_body=system.extra_body)
    warm = random_requests(2, args.input_len, args.output_len, tokenizer, seed=999)
    await run(config, warm, progress=False)
    rows = []
    for concurrency in args.concurrency:
        n = requests_for(concurrency, system.max_requests)
        requests = random_requests(n, args.input_len, args.output_len, tokenizer, seed=concurrency)
        level = RunConfig(
            base_url, model, concurrency, ignore_eos=system.ignore_eos, extra_body=system.extra_body
        )
        results, duration = await run(level, requests, progress=not args.no_progress)
        summary = summarize(results, duration)
        errors = sorted({r.error for r in results if not r.success})[:3]
        rows.append({"system": system.name, "concurrency": concurrency, "requests": n, "errors": errors,
                     **summary.to_dict()})  # fmt: skip
        print(f"{system.name:<19} c={concurrency:<3} n={n:<3} out {summary.output_throughput:7.1f} tok/s"
              f"  ttft p50 {summary.ttft.median_ms:8.0f} ms  tpot p50 {summary.tpot.median_ms:6.1f} ms"
              f"  failed {summary.failed}", flush=True)  # fmt: skip
    return rows


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), ""
    )
    return {
        "cpu": model or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "host": platform.node(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model", default=None, help="HF folder (default: the prepared demo model)")
    add("--systems", nargs="+", default=list(ALL[:3]), choices=ALL)
    add("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    add("--input-len", type=int, default=64)
    add("--output-len", type=int, default=32)
    add("--baseline-max-requests", type=int, default=64, help="cap per level for the one-at-a-time servers")
    add("--threads", type=int, default=None, help="torch threads per system (default: all cores)")
    add("--llamacpp-python", default="/tmp/llamacpp-venv/bin/python", help="python with llama-cpp-python")
    add("--gguf", default=None, help="the demo GGUF for llama.cpp")
    add("--eos-ids", type=int, nargs="+", default=[0, 2], help="EOS ids llama.cpp must not sample")
    add("--logs", default="/tmp/scalellm-serving-bench", help="each system's output goes here")
    add("--out", default="serving_results.json")
    add("--plot", default=None, help="PNG of output throughput and median TTFT against concurrency")
    add("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from scalellm.models.prepare import resolve_model_dir

    model = str(resolve_model_dir(args.model))
    tokenizer = load_tokenizer(model)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
                              "config": vars(args), "rows": []}  # fmt: skip
    for system in make_systems(args, model):
        with Running(system, Path(args.logs) / f"{system.name}.log") as base_url:
            report["rows"] += asyncio.run(measure(system, base_url, args, tokenizer))
        Path(args.out).write_text(json.dumps(report, indent=1))  # after each system: partial results survive
    from bench.serving.report import markdown, plot

    print(markdown(report["rows"]))
    if args.plot:
        plot(report["rows"], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
