"""int8 weight-only linear layers against the bfloat16 oneDNN-packed ones, at decode shapes.

    python bench/quant_linear.py                 # the demo model's shapes, M = 1..64 rows
    python bench/quant_linear.py --rows 1 8 64 --repeats 200

For each (in, out) shape of SmolLM2-135M's linear layers and each row count M, side by side in one
run, interleaved call by call: PackedLinear (bfloat16, oneDNN), Int8Linear as the engine runs it
(models/quant_linear.py: ``torch._weight_int8pack_mm`` up to GEMV_ROWS rows, else the int8 weight
converted and one matmul), each of its two kernels on its own, and for comparison a W8A8 matmul
(activations quantized per token, ``torch._int_mm``). Medians in microseconds.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.models.packed_linear import PackedLinear
from scalellm.models.quant_linear import Int8Linear

SHAPES = {
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median microseconds of each function, calls interleaved so load changes hit all alike,
    in a new random order each round, so none always runs right after the same one (whose data
    evicted its weights from the caches: a rotation keeps the neighbours)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(items)
        for name, fn in items:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: 1e6 * statistics.median(v) for k, v in times.items()}


def kernels(packed: PackedLinear, int8: Int8Linear, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    return {
        "bf16": lambda: packed(x),
        "int8": lambda: int8(x),
        "gemv": lambda: torch._weight_int8pack_mm(x, int8.qweight, int8.scales),
        "convert": lambda: F.linear(x, int8.qweight.to(x.dtype)).mul_(int8.scales),
        "w8a8": lambda: w8a8(x, int8),
    }


def w8a8(x: torch.Tensor, int8: Int8Linear) -> torch.Tensor:
    """For comparison only (not what the engine runs): activations quantized per token too, then
    torch._int_mm (int8 x int8 -> int32, VNNI) and both scales."""
    xf = x.float()
    xs = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    xq = torch.round(xf / xs).to(torch.int8)
    return (torch._int_mm(xq, int8.qweight.t()).float() * xs * int8.scales.float()).to(x.dtype)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        "layer | M | bf16 packed us | int8 (engine) us | int8pack_mm us | convert+matmul us | w8a8 _int_mm us | engine/bf16"
    )
    for name in args.shapes:
        k, n = SHAPES[name]
        linear = nn.Linear(k, n, bias=False).to(torch.bfloat16)
        packed, int8 = PackedLinear(linear), Int8Linear.from_linear(linear)
        for m in args.rows:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            t = interleaved(kernels(packed, int8, x), args.repeats)
            print(
                f"{name} | {m} | {t['bf16']:.0f} | {t['int8']:.0f} | {t['gemv']:.0f} | {t['convert']:.0f} | {t['w8a8']:.0f} | "
                f"{t['int8'] / t['bf16']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
