"""Decode-step time of the weight quantization modes side by side, speed only (no quality).

    python -m bench.quant_speed --modes none int8 w8a8 --batches 1 64 --rounds 15

Each mode its own ModelRunner on the demo model (the engine's auto dtype unless --dtype); per
batch size, one decode step of every stream at a context of 128 tokens, every row's logits
included, modes interleaved round by round (bench/quality.py's decode_step_times); medians, and
output tokens/s = batch / step.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from bench.quality import decode_step_times, make_runner
from scalellm.models.prepare import resolve_model_dir
from scalellm.models.quant_linear import weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--modes", nargs="+", default=["none", "w8a8"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model)
    runners = {
        m: make_runner(model_dir, args.dtype, m, "auto", 128 + args.rounds + 8, kv_cache_gb=1.0)
        for m in args.modes
    }
    dtype = next(iter(runners.values())).dtype
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, {dtype}, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    for m, r in runners.items():
        print(f"{m}: weights {weight_bytes(r.model) / 1e6:.0f} MB")
    for b in args.batches:
        times = decode_step_times(runners, b, 128, args.rounds)
        line = ", ".join(f"{m} {1e3 * t:.1f} ms ({b / t:.0f} tok/s)" for m, t in times.items())
        print(f"batch {b}: {line}  [load {os.getloadavg()[0]:.1f}]", flush=True)


if __name__ == "__main__":
    main()
