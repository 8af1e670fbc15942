"""A step's prefill attention: our kernel (one call for every chunk) against torch's SDPA chunk by
chunk (what TorchSDPA does). On a GPU the kernel is Triton's varlen kernel; on CPU (--kernel cpu)
csrc/paged_decode.cpp's paged_prefill (bfloat16 tiles where the CPU has AVX512-BF16, else decode
rows), with no length limit (the engine sends chunks past its limit to SDPA instead).

    python bench/prefill_attention.py [--device cuda] [--kernel triton|cpu] [--shape 8b|smollm|tiny]
        [--dtype bfloat16] [--workload NAME ...] [--threads N] [--repeats 20] [--json OUT]

One layer of an engine-shaped paged cache (blocks of 16, scattered), the chunks' K/V already in
it, and one call of each backend's ``prefill`` over the whole step, timed with a device
synchronize around it (median of --repeats after 3 warm-ups). Workloads (chunks as length on
cached context):

    burst     64 prompts of 128 tokens, nothing cached (a burst of new requests)
    long      one prompt of 2048 tokens
    chunked   one 2048-token chunk on 6144 cached tokens (chunked prefill of a long prompt)
    mixed     8 chunks of 256 tokens on 1024 cached each (prefix-cache hits)
    prompt    one prompt of 128 tokens (the side by side's)
    medium    one prompt of 512 tokens

Reported: ms per call for each backend, their ratio, and the attention's TFLOP/s (4 x query
heads x head_dim per (query, key) pair it attends, causal pairs only). ``--shape tiny`` with
TRITON_INTERPRET=1 runs on CPU in seconds (tests/unit/test_prefill_attention_bench.py): its figures
check the code, not a device.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scalellm.engine.attention import AttentionBackend, AttentionMetadata, PrefillSpan, TorchSDPA  # noqa: E402

BLOCK_SIZE = 16
SHAPES = {"8b": (32, 8, 128), "smollm": (9, 3, 64), "tiny": (4, 2, 16)}  # query heads, K/V heads, head_dim
WORKLOADS: dict[str, list[tuple[int, int]]] = {  # (context, length) per chunk
    "burst": [(0, 128)] * 64,
    "long": [(0, 2048)],
    "chunked": [(6144, 2048)],
    "mixed": [(1024, 256)] * 8,
    "prompt": [(0, 128)],
    "medium": [(0, 512)],
}
TINY_WORKLOADS: dict[str, list[tuple[int, int]]] = {
    "burst": [(0, 8)] * 4,
    "long": [(0, 40)],
    "chunked": [(50, 20)],
    "mixed": [(17, 9)] * 3,
    "prompt": [(0, 8)],
    "medium": [(0, 24)],
}


def step(
    chunks: list[tuple[int, int]], shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[PrefillSpan], torch.Tensor, torch.Tensor]:
    """q, new_kv, a one-layer cache view and the chunks' spans, bounds and padded tables."""
    heads, kv_heads, dim = shape
    g = torch.Generator().manual_seed(0)
    widths = [-(-(c + n) // BLOCK_SIZE) for c, n in chunks]
    ids = torch.randperm(sum(widths), generator=g).tolist()
    spans, bounds, tables, slots, row = [], [], [], [], 0
    for (context, n), w in zip(chunks, widths, strict=True):
        table, ids = ids[:w], ids[w:]
        spans.append(PrefillSpan(row, row + n, context, torch.tensor(table, device=device)))
        bounds.append([row, n, context])
        tables.append(table + [0] * (max(widths) - w))
        slots += [(table[p // BLOCK_SIZE], p % BLOCK_SIZE) for p in range(context, context + n)]
        row += n
    kv = torch.randn(sum(widths), 2, BLOCK_SIZE, kv_heads, dim, generator=g).to(dtype).to(device)
    q = torch.randn(row, heads, dim, generator=g).to(dtype).to(device)
    new_kv = torch.randn(row, 2, kv_heads, dim, generator=g).to(dtype).to(device)
    blocks, offsets = torch.tensor(slots, device=device).unbind(1)
    kv[blocks, :, offsets] = new_kv  # the step's K/V in its slots, as write_kv leaves them
    return q, new_kv, kv, spans, torch.tensor(bounds, device=device), torch.tensor(tables, device=device)


def attended_pairs(chunks: list[tuple[int, int]]) -> int:
    """(query, key) pairs under the causal mask: each token sees its context and itself."""
    return sum(n * context + n * (n + 1) // 2 for context, n in chunks)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernel_backend(name: str) -> AttentionBackend:
    """The backend whose one-call prefill is measured: Triton's, or the CPU kernels' (no limit)."""
    if name == "cpu":
        from scalellm.engine import cpu_kernels

        if not cpu_kernels.available():
            raise SystemExit("the CPU kernels did not build here")
        return cpu_kernels.CpuPagedDecode(None)
    from scalellm.engine import attention_triton

    return attention_triton.TritonPagedDecode()


def run(workload: str, chunks: list[tuple[int, int]], args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    q, new_kv, kv, spans, bounds, tables = step(chunks, shape, dtype, device)
    scale = shape[2] ** -0.5
    backends = {"kernel": kernel_backend(args.kernel), "sdpa": TorchSDPA()}
    result: dict[str, Any] = {"workload": workload, "chunks": len(chunks), "tokens": q.shape[0]}
    outs = {}
    for name, backend in backends.items():
        empty = torch.zeros(0, dtype=torch.long, device=device)
        meta = AttentionMetadata(
            empty, empty, 0, None, None, tuple(spans), backend, prefill_bounds=bounds, prefill_tables=tables
        )
        meta = backend.prepare(meta, BLOCK_SIZE)
        out = torch.empty_like(q)
        call = functools.partial(backend.prefill, q, new_kv, kv, meta, scale, out)
        result[f"{name}_ms"] = time_ms(call, device, args.repeats)
        outs[name] = out
    flops = 4 * shape[0] * shape[2] * attended_pairs(chunks)
    result["sdpa_over_kernel"] = result["sdpa_ms"] / result["kernel_ms"]
    result["kernel_tflops"] = flops / result["kernel_ms"] / 1e9
    result["sdpa_tflops"] = flops / result["sdpa_ms"] / 1e9
    result["max_abs_diff"] = (outs["kernel"].float() - outs["sdpa"].float()).abs().max().item()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--kernel", choices=["triton", "cpu"], default="triton")
    parser.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = TINY_WORKLOADS if args.shape == "tiny" else WORKLOADS
    results = [run(name, table[name], args) for name in args.workload]
    print(
        f"prefill attention, {args.shape} heads {SHAPES[args.shape]}, {args.dtype}, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    k = args.kernel
    print(
        f"| workload | chunks | tokens | {k} ms | sdpa ms | sdpa / {k} | {k} TFLOP/s | sdpa TFLOP/s | max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['workload']} | {r['chunks']} | {r['tokens']} | {r['kernel_ms']:.3f} | {r['sdpa_ms']:.3f} "
            f"| {r['sdpa_over_kernel']:.2f}x | {r['kernel_tflops']:.3f} | {r['sdpa_tflops']:.3f} "
            f"| {r['max_abs_diff']:.2e} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
        )


if __name__ == "__main__":
    main()
