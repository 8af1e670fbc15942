"""csrc/quant_ops.cpp's w8a8_linear against the float layer it replaces (float32 F.linear through
MKL, or bfloat16 PackedLinear through oneDNN: AMX where the CPU has it), and optionally against
the same kernel's source at another git revision (packed as that revision reads it), at the demo
model's decode shapes.

    python -m bench.w8a8_kernel                      # w8a8 vs float32, M = 1 8 16 64 rows
    python -m bench.w8a8_kernel --dtype bfloat16     # w8a8 vs bfloat16 PackedLinear
    python -m bench.w8a8_kernel --against main       # + the kernel as committed on main (A/B)
    python -m bench.w8a8_kernel --paths vnni avx2    # + those paths of w8a8_linear, forced

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
from torch import nn

from bench.quant_linear import SHAPES, interleaved
from scalellm.engine import cpu_kernels
from scalellm.models.packed_linear import PackedLinear
from scalellm.models.quant_linear import pack_w8a8, quantize_per_channel

CSRC = Path(cpu_kernels.__file__).parent / "csrc"


def load_revision(rev: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Compile quant_ops.cpp as of git ``rev`` under op namespace scalellm_ab; returns it and the
    packing its w8a8_linear reads (revisions before the VNNI layout: [N/16, K/2, 16, 2])."""
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
    return "scalellm_ab", pack_pairs if "packed.size(3) == 2" in source else pack_w8a8


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """The layout of w8a8_linear before the VNNI one: [N/16, K/2, 16, 2], zeros padding N and K."""
    n, k = q.shape
    n_pad, k_pad = -(-n // 16) * 16, -(-k // 2) * 2
    padded = torch.zeros(n_pad, k_pad, dtype=torch.int8)
    padded[:n, :k] = q
    return padded.view(n_pad // 16, 16, k_pad // 2, 2).permute(0, 2, 1, 3).contiguous()


def w8a8(
    namespace: str, x: torch.Tensor, packed: torch.Tensor, s: torch.Tensor, path: int | None = None
) -> Callable[[], object]:
    op = getattr(torch.ops, namespace).w8a8_linear
    out = torch.empty(x.shape[0], s.shape[0], dtype=x.dtype)
    if path is None:  # the default path (and the only signature of older revisions)
        return lambda: op(out, x, packed, s, None)
    return lambda: op(out, x, packed, s, None, path)


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
    parser.add_argument(
        "--paths",
        nargs="+",
        default=[],
        choices=list(cpu_kernels.W8A8_PATHS),
        help="also time these paths of w8a8_linear (the default path is the w8a8 column)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="activations' dtype; the baseline is F.linear (float32) or PackedLinear (bfloat16)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert cpu_kernels.available(), "the CPU kernels did not build"
    other, other_pack = load_revision(args.against) if args.against else (None, pack_w8a8)
    torch.manual_seed(0)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, loadavg {os.getloadavg()[0]:.2f}"
    )
    dtype = getattr(torch, args.dtype)
    base = "f32" if dtype == torch.float32 else "bf16"
    cols = f"layer | M | {base} us | w8a8 us" + (
        f" | {args.against} us | new/{args.against}" if other else ""
    )
    cols += "".join(f" | {path} us" for path in args.paths)
    print(cols + f" | w8a8/{base}")
    for name in args.shapes:
        k, n = SHAPES[name]
        w = torch.randn(n, k).to(dtype)
        q, s = quantize_per_channel(w, dtype)
        packed, other_packed = pack_w8a8(q), other_pack(q)
        linear = nn.Linear(k, n, bias=False, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
        reference = PackedLinear(linear) if dtype == torch.bfloat16 else functools.partial(F.linear, weight=w)
        for m in args.rows:
            x = torch.randn(m, k).to(dtype)
            fns: dict[str, Callable[[], object]] = {
                "ref": functools.partial(reference, x),
                "new": w8a8("scalellm_cpu", x, packed, s),
            }
            if other:
                fns["old"] = w8a8(other, x, other_packed, s)
            for path in args.paths:
                fns[path] = w8a8("scalellm_cpu", x, packed, s, cpu_kernels.W8A8_PATHS[path])
            t = interleaved(fns, args.repeats)
            line = f"{name} | {m} | {t['ref']:.0f} | {t['new']:.0f}"
            if other:
                line += f" | {t['old']:.0f} | {t['new'] / t['old']:.2f}"
            line += "".join(f" | {t[path]:.0f}" for path in args.paths)
            print(line + f" | {t['new'] / t['ref']:.2f}", flush=True)
    print(f"# loadavg after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
