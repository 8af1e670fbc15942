"""The engine's offline run under each torch SDPA backend, repeat by repeat (a GPU diagnostic).

    python bench/sdpa_backends.py --model FOLDER [--num-requests 64] [--repeats 3]

One process per backend choice (torch's default, all but cuDNN, math, efficient, cudnn, flash), each running the
engine_throughput workload --repeats times. Repeats that get faster and faster point at per-shape
set-up cost (a kernel plan built for every new batch or context width); a backend that fails
says so. Where one step's time goes: bench/step_profile.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BACKENDS = ("default", "no-cudnn", "math", "efficient", "cudnn", "flash")


def child(model: str, backend: str, n: int, repeats: int) -> None:
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
    for _ in range(repeats):
        with sdpa_kernel(chosen) if chosen else contextlib.nullcontext():
            try:
                times.append(round(run_ours(llm, work), 3))
            except Exception as exc:
                print(json.dumps({"backend": backend, "error": f"{type(exc).__name__}: {exc}"[:300]}))
                return
    print(json.dumps({"backend": backend, "seconds": times, "tokens": work.output_tokens}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child, args.num_requests, args.repeats)
        return
    for backend in args.backends:
        t = time.perf_counter()
        cmd = [sys.executable, __file__, "--model", args.model, "--child", backend]
        cmd += ["--num-requests", str(args.num_requests), "--repeats", str(args.repeats)]
        subprocess.run(cmd, check=False)
        print(f"({backend}: {time.perf_counter() - t:.0f} s with start-up)", flush=True)


if __name__ == "__main__":
    main()
