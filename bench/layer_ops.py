"""A decoder layer's small ops, torch's against the fused C++ ones, one torch thread.

    python bench/layer_ops.py [--tokens 1 64] [--dtypes bfloat16 float32] [--repeats 200]

SmolLM2's shapes (hidden 576, intermediate 1536, 9 + 3 + 3 heads of 64): the residual add and
RMSNorm, SiLU-and-mul, rope on q and k, and the K/V cache write, each as ``models.ops.TorchOps``
(and the indexed copy of ``attention.TorchSDPA``) and as ``cpu_kernels.CpuFusedOps`` (and
``CpuPagedDecode.write_kv``), and greedy sampling's argmax over the 49152-token vocabulary
(``torch.argmax`` against ``cpu_kernels.argmax``). Calls alternate between the two; prints the
minimum and median microseconds per call. A step runs each layer op about 30-60 times (once or
twice per layer) and the argmax once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cases(tokens: int, dtype: torch.dtype) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """op name -> (torch's call, the fused call) on fresh random inputs."""
    from scalellm.engine import cpu_kernels
    from scalellm.engine.attention import AttentionMetadata, TorchSDPA
    from scalellm.models.config import RopeConfig
    from scalellm.models.llama import RotaryEmbedding
    from scalellm.models.ops import TorchOps

    ref, fused = TorchOps(), cpu_kernels.CpuFusedOps()
    x, residual = torch.randn(tokens, 576).to(dtype), torch.randn(tokens, 576).to(dtype)
    weight = torch.randn(576).to(dtype)
    gate_up = torch.randn(tokens, 2 * 1536).to(dtype)
    qkv = torch.randn(tokens, 15, 64).to(dtype)
    cos, sin = RotaryEmbedding(RopeConfig(), 64, 512).tables(torch.arange(tokens) + 100, dtype)
    cache = torch.zeros(256, 30, 2, 16, 3, 64, dtype=dtype)[:, 7]
    slots = torch.randperm(256)[:tokens]
    meta = AttentionMetadata(slots, torch.arange(tokens) % 16, tokens, None, None, (), TorchSDPA())
    new_kv = qkv[:, 9:].unflatten(1, (2, 3))
    paged = cpu_kernels.CpuPagedDecode(None)
    logits = torch.randn(tokens, 49152).to(dtype)
    return {
        "add + rms_norm": (
            lambda: ref.rms_norm(x, weight, 1e-5, residual),
            lambda: fused.rms_norm(x, weight, 1e-5, residual),
        ),
        "silu_mul": (lambda: ref.silu_mul(gate_up), lambda: fused.silu_mul(gate_up)),
        "rope (q and k)": (
            lambda: ref.rope_(qkv[:, :12], cos, sin),
            lambda: fused.rope_(qkv[:, :12], cos, sin),
        ),
        "kv cache write": (
            lambda: TorchSDPA().write_kv(cache, new_kv, meta),
            lambda: paged.write_kv(cache, new_kv, meta),
        ),
        "argmax (vocab)": (lambda: logits.argmax(dim=-1), lambda: cpu_kernels.argmax(logits)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    from scalellm.engine import cpu_kernels

    torch.set_num_threads(1)
    assert cpu_kernels.available(), "the CPU kernels do not build here"
    print(
        f"load average {Path('/proc/loadavg').read_text().split()[0]}, {torch.backends.cpu.get_cpu_capability()}"
    )
    with torch.inference_mode():
        for dtype in args.dtypes:
            for tokens in args.tokens:
                for name, (ref, fused) in cases(tokens, getattr(torch, dtype)).items():
                    times: tuple[list[float], list[float]] = ([], [])
                    for _ in range(args.repeats):
                        for fn, out in zip((ref, fused), times, strict=True):
                            start = time.perf_counter()
                            fn()
                            out.append((time.perf_counter() - start) * 1e6)
                    (rmin, rmed), (fmin, fmed) = ((min(t), statistics.median(t)) for t in times)
                    print(f"{dtype:8s} {tokens:3d} tokens {name:15s} torch {rmin:7.1f} / {rmed:7.1f} us  "
                          f"fused {fmin:7.1f} / {fmed:7.1f} us  (min / median; torch/fused {rmin / fmin:.1f}x min)",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
