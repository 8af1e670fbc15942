"""The engine's offline run under each torch SDPA backend, repeat by repeat (a GPU diagnostic).

    python bench/sdpa_backends.py --model FOLDER [--num-requests 64] [--repeats 3] [--profile]

One process per backend choice (torch's default, all but cuDNN, math, efficient, cudnn, flash), each running the
engine_throughput workload --repeats times. Repeats that get faster and faster point at per-shape
set-up cost (a kernel plan built for every new batch or context width); a backend that fails
says so. --profile adds a torch profiler table of the last repeat under the default choice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BACKENDS = ("default", "no-cudnn", "math", "efficient", "cudnn", "flash")


def child(model: str, backend: str, n: int, repeats: int, profile: bool) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.engine_throughput import make_workload, run_ours
    from scalellm import LLM

    llm = LLM(model=model, max_num_seqs=n, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    vocab = llm.engine.model_config.vocab_size
    work = make_workload(n, vocab, seed=n)
    chosen = {
        "no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
    }.get(backend)
    times = []
    for i in range(repeats):
        ctx = sdpa_kernel(chosen) if chosen else torch.autograd.profiler.record_function("run")
        last_profiled = profile and i == repeats - 1
        prof = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        )
        with ctx:
            if last_profiled:
                prof.start()
            try:
                times.append(round(run_ours(llm, work), 3))
            except Exception as exc:
                print(json.dumps({"backend": backend, "error": f"{type(exc).__name__}: {exc}"[:300]}))
                return
            if last_profiled:
                prof.stop()
    print(json.dumps({"backend": backend, "seconds": times, "tokens": work.output_tokens}), flush=True)
    if profile:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.num_requests, args.repeats, args.profile)
        return
    for backend in args.backends:
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--model", args.model, "--child", backend]
        cmd += ["--num-requests", str(args.num_requests), "--repeats", str(args.repeats)]
        cmd += ["--profile"] if args.profile and backend == "default" else []
        subprocess.run(cmd, check=False)
        print(f"({backend}: {time.perf_counter() - t:.0f} s with start-up)", flush=True)


if __name__ == "__main__":
    main()
