"""The CPU paged decode kernel against an older version of itself and against gather + SDPA.

    python bench/decode_kernel.py --baseline-rev HEAD~1 [--batch 1 64] [--context 192] [--repeats 60]
                                  [--layers 30] [--threads 1] [--rows 1] [--kv-cache-dtype int8]

SmolLM2's attention shape (9 query heads, 3 K/V heads, head dim 64; --heads and --head-dim change
it) over a block-major cache of --layers layers, each attended in turn as a decode step does, so a
layer's K/V comes from memory, not from the cache the previous call warmed (--layers 1 measures
the hot case). --rows R gives each request R consecutive rows over its one block table, the
last R tokens of its context each attending to the tokens up to itself, as a decode and its R - 1
draft tokens do (speculative decoding). The figures are ms per layer, on --threads torch threads. The baseline is
``scalellm/engine/csrc/paged_decode.cpp`` as it was at --baseline-rev, built under its own name
and op namespace so both load into this process; the two kernels run interleaved in each repeat, each
first in every other one, so load from other processes hits both alike; gather + SDPA runs after
them (10 repeats at most). Prints the minimum and median ms per call. --kv-cache-dtype int8: both
kernels read an int8 cache (engine/kv_quant.py; the baseline must be a revision whose kernel does,
6ee5f22 or later) and gather + SDPA dequantizes what it gathers, as Int8KVSDPA.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SOURCE = "scalellm/engine/csrc/paged_decode.cpp"
HEADERS = ("scalellm/engine/csrc/vec512.h", "scalellm/engine/csrc/vec256.h", "scalellm/engine/csrc/kernels.h")


def build_baseline(rev: str, folder: Path) -> Callable[..., None]:
    from scalellm.engine import cpu_kernels

    files = []  # the kernel and, once it had them, its headers, under a namespace of their own
    for path in (SOURCE, *HEADERS):
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            files.append(folder / Path(path).name)
            files[-1].write_text(shown.stdout.replace("scalellm_cpu", "scalellm_cpu_baseline"))
    if not files or files[0].suffix != ".cpp":
        raise SystemExit(f"{SOURCE} is not in revision {rev}")
    cpu_kernels.build((files[0],), cpu_kernels.build_name(tuple(files), "scalellm_cpu_baseline"))
    return torch.ops.scalellm_cpu_baseline.paged_decode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-rev", default="HEAD", help="git revision of the baseline kernel")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=192, help="tokens per request (each varies by -16..0)")
    parser.add_argument("--heads", type=int, nargs=2, default=[9, 3], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=1, help="rows per request (1 + draft tokens)")
    parser.add_argument(
        "--kv-cache-dtype", choices=["auto", "int8"], default="auto", help="int8: an int8 cache (kv_quant.py)"
    )
    args = parser.parse_args()

    from scalellm.engine import cpu_kernels

    torch.set_num_threads(args.threads)
    assert cpu_kernels.available(), "the current kernel does not build here"
    with tempfile.TemporaryDirectory() as tmp:
        baseline = build_baseline(args.baseline_rev, Path(tmp))
    current = torch.ops.scalellm_cpu.paged_decode
    print(
        f"load average {Path('/proc/loadavg').read_text().split()[0]}, {torch.backends.cpu.get_cpu_capability()}"
    )
    for dtype_name in args.dtypes:
        for batch in args.batch:
            case = make_case(batch, getattr(torch, dtype_name), args)
            out = torch.empty(case.q.shape, dtype=case.q.dtype)
            layers = [case.cache[:, layer] for layer in range(args.layers)]  # the engine's strided views
            kernels: dict[str, Callable[[], object]] = {
                f"baseline ({args.baseline_rev})": functools.partial(run_kernel, baseline, out, case, layers),
                "current": functools.partial(run_kernel, current, out, case, layers),
            }
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for repeat in range(args.repeats):  # interleaved, each first in every other repeat
                for name in sorted(kernels, reverse=repeat % 2 == 1):
                    times[name] += per_layer_ms(kernels[name], 1, args.layers)
            # apart from the kernels: in one A/A run the kernel timed right after it was 17% slower
            sdpa = per_layer_ms(functools.partial(run_sdpa, case, layers), min(args.repeats, 10), args.layers)
            times = {"gather+sdpa": sdpa, **times}
            cells = ", ".join(
                f"{name} {min(t):.3f} / {statistics.median(t):.3f}" for name, t in times.items()
            )
            print(
                f"{dtype_name:8s} batch {batch:3d} x {args.rows} rows: min / median ms: {cells}", flush=True
            )


def per_layer_ms(fn: Callable[[], object], repeats: int, layers: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3 / layers)
    return times


@dataclass(frozen=True)
class Case:
    q: torch.Tensor
    cache: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    mask: torch.Tensor
    scale: float


def run_sdpa(case: Case, layers: list[torch.Tensor]) -> None:
    from scalellm.engine.attention import _decode
    from scalellm.engine.kv_quant import dequantize_rows

    for kv in layers:
        if kv.dtype == torch.int8:  # as Int8KVSDPA: the gathered blocks dequantized
            kv = dequantize_rows(kv, case.q.dtype)
        _decode(case.q, kv[:, 0], kv[:, 1], case.tables, case.mask, case.scale)


def run_kernel(
    kernel: Callable[..., None], out: torch.Tensor, case: Case, layers: list[torch.Tensor]
) -> None:
    for kv in layers:
        kernel(out, case.q, kv, case.tables, case.lens, case.scale)


def make_case(batch: int, dtype: torch.dtype, args: argparse.Namespace) -> Case:
    """batch decodes of about --context tokens in scattered blocks of a --layers block-major cache
    [blocks, layers, 2, block_size, Hkv, D] (int8 rows of D + 2 with --kv-cache-dtype int8), each
    --rows rows (request b's rows consecutive, its last row seeing its whole context, each row
    before it one token less)."""
    from scalellm.engine import huge_pages
    from scalellm.engine.kv_quant import quantize_rows

    hq, hkv = args.heads
    bs = 16
    nblocks = -(-args.context // bs)
    gen = torch.Generator().manual_seed(batch)
    shape = (batch * nblocks, args.layers, 2, bs, hkv, args.head_dim)
    values = torch.randn(shape, generator=gen)
    if args.kv_cache_dtype == "int8":
        values = quantize_rows(values)
    cache = huge_pages.empty(values.shape, values.dtype if args.kv_cache_dtype == "int8" else dtype)
    cache.copy_(values)  # in 2 MB pages where it can be, as the engine's
    tables = torch.randperm(batch * nblocks, generator=gen).view(batch, nblocks)
    lens = args.context - torch.randint(0, 16, (batch,), generator=gen)
    rows = args.rows
    tables = tables.repeat_interleave(rows, dim=0)
    lens = (lens.unsqueeze(1) - torch.arange(rows - 1, -1, -1)).flatten()
    q = torch.randn(batch * rows, hq + 2 * hkv, args.head_dim, generator=gen).to(dtype)[:, :hq]
    mask = (torch.arange(nblocks * bs).unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
    return Case(q, cache, tables, lens, mask, args.head_dim**-0.5)


if __name__ == "__main__":
    main()
