"""Linear layers of a bfloat16 (or --dtype float32) model on this CPU: torch's matmul, our
kernel (``PanelLinear``'s kernel path, at every row count), oneDNN on a weight reordered in the
model's dtype (``PackedLinear``: what AMX CPUs use for bfloat16), and a float32 copy of the
weight through oneDNN (what PanelLinear uses for many rows on AVX-512 CPUs without AVX512-BF16)
or through our panels (to compare).

    python bench/bf16_linear.py [--rows 1 8 64 256] [--threads 1] [--repeats 30] [--layers 1]
        [--paths torch kernel onednn-same onednn panels] [--dtype float32]

SmolLM2's shapes (hidden 576: q/k/v 960, gate/up 3072, down from 1536, o 576, lm_head 49152).
Calls alternate between the paths; prints the minimum and median ms per call. ``--layers N``
gives each path N copies of the layer, called in turn, so that with N large enough (30: the
model's layers) the weights come from memory as in a step, not from the cache the previous call
warmed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quant_linear import SHAPES  # noqa: E402  (the demo model's linear shapes, one table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--layers", type=int, default=1, help="copies of each layer, called in turn")
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=["torch", "kernel", "onednn-same", "onednn", "panels"],
        default=["torch", "kernel", "onednn"],
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scalellm.engine import cpu_kernels
    from scalellm.models.packed_linear import PackedLinear, PanelLinear, packing_supported

    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels could not be built here")

    dtype = getattr(torch, args.dtype)
    tag = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"{args.dtype}, threads {args.threads}, load {Path('/proc/loadavg').read_text().split()[0]}")
    for name, (k, n) in SHAPES.items():
        copies = [torch.nn.Linear(k, n, bias=False) for _ in range(args.layers)]
        bf16 = [linear.to(dtype) for linear in copies]
        paths: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
        if "torch" in args.paths:
            paths[f"torch {tag}"] = [partial(F.linear, weight=b.weight) for b in bf16]
        if "kernel" in args.paths:
            paths[f"kernel {tag}"] = [PanelLinear(b, max_kernel_rows=1 << 30) for b in bf16]
        if "onednn-same" in args.paths and packing_supported(torch.device("cpu"), dtype):
            paths[f"oneDNN {tag}"] = [PackedLinear(b) for b in bf16]
        if "onednn" in args.paths and packing_supported(torch.device("cpu"), torch.float32):
            packed = [PackedLinear(torch.nn.Linear(k, n, bias=False)) for _ in range(args.layers)]
            paths["oneDNN fp32"] = [lambda x, p=p: p(x.float()) for p in packed]
        if "panels" in args.paths:
            wide = [PanelLinear(torch.nn.Linear(k, n, bias=False)) for _ in range(args.layers)]
            paths["panels fp32"] = [lambda x, p=p: p(x.float()) for p in wide]
        for rows in args.rows:
            x = torch.randn(rows, k).to(dtype)
            times: dict[str, list[float]] = {p: [] for p in paths}
            with torch.inference_mode():
                for _ in range(args.repeats):
                    for p, layers in paths.items():
                        start = time.perf_counter()
                        for fn in layers:
                            fn(x)
                        times[p].append((time.perf_counter() - start) * 1e3 / len(layers))
            cells = "  ".join(f"{p} {min(t):7.3f}/{statistics.median(t):7.3f}" for p, t in times.items())
            print(f"{name:8s} {k:5d}x{n:<6d} rows {rows:4d}: {cells}  (ms min/median)", flush=True)


if __name__ == "__main__":
    main()
