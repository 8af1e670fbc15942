"""csrc/quant_ops.cpp's w8a8_linear against float32 F.linear (oneDNN), and optionally against
the same kernel's source at another git revision, at the demo model's decode shapes.

    python bench/w8a8_kernel.py                      # w8a8 vs float32, M = 1 8 16 64 rows
    python bench/w8a8_kernel.py --against main       # + the kernel as committed on main (A/B)

The ``--against`` source is compiled as a second extension (its op namespace renamed), so both
kernels run in one process, interleaved call by call: a load change hits both alike. Medians in
microseconds.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.quant_linear import SHAPES, interleaved
from scalellm.engine import cpu_kernels
from scalellm.models.quant_linear import pack_w8a8, quantize_per_channel

CSRC = Path(cpu_kernels.__file__).parent / "csrc"


def load_revision(rev: str) -> str:
    """Compile quant_ops.cpp as of git ``rev`` under op namespace scalellm_ab; returns it."""
    source = subprocess.run(
        ["git", "show", f"{rev}:scalellm/engine/csrc/quant_ops.cpp"],
        cwd=CSRC,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.replace("TORCH_LIBRARY_FRAGMENT(scalellm_cpu", "TORCH_LIBRARY_FRAGMENT(scalellm_ab")
    folder = Path(tempfile.mkdtemp(prefix="w8a8_ab_"))
    path = folder / "quant_ops_ab.cpp"
    path.write_text(source)
    from torch.utils.cpp_extension import load

    load(
        name=cpu_kernels.build_name((path,), prefix="scalellm_ab"),
        sources=[str(path)],
        extra_cflags=[*cpu_kernels.CFLAGS, f"-I{CSRC}"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    return "scalellm_ab"


def w8a8(namespace: str, x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor) -> Callable[[], object]:
    op = getattr(torch.ops, namespace).w8a8_linear
    out = torch.empty(x.shape[0], s.shape[0], dtype=x.dtype)
    return lambda: op(out, x, packed, s, None)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--against", help="git revision whose w8a8_linear to run side by side")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert cpu_kernels.available(), "the CPU kernels did not build"
    other = load_revision(args.against) if args.against else None
    torch.manual_seed(0)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, loadavg {os.getloadavg()[0]:.2f}"
    )
    cols = "layer | M | f32 us | w8a8 us" + (f" | {args.against} us | new/{args.against}" if other else "")
    print(cols + " | w8a8/f32")
    for name in args.shapes:
        k, n = SHAPES[name]
        w = torch.randn(n, k)
        q, s = quantize_per_channel(w, torch.float32)
        packed = pack_w8a8(q)
        for m in args.rows:
            x = torch.randn(m, k)
            fns: dict[str, Callable[[], object]] = {
                "f32": functools.partial(F.linear, x, w),
                "new": w8a8("scalellm_cpu", x, packed, s),
            }
            if other:
                fns["old"] = w8a8(other, x, packed, s)
            t = interleaved(fns, args.repeats)
            line = f"{name} | {m} | {t['f32']:.0f} | {t['new']:.0f}"
            if other:
                line += f" | {t['old']:.0f} | {t['new'] / t['old']:.2f}"
            print(line + f" | {t['new'] / t['f32']:.2f}", flush=True)
    print(f"# loadavg after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
