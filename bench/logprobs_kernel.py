"""Logprobs over the vocabulary: the sampler's torch ops against csrc/logprobs.cpp, one tree.

    python bench/logprobs_kernel.py [--rows 64 1024] [--top 0 5 20] [--dtypes bfloat16 float32]
        [--vocab 49152] [--repeats 9] [--threads 2]

Times ``Sampler.token_logprobs`` (what prompt logprobs run: rows of a prefill chunk; a decode
step's rows with logprobs run the same pass) on random logits in the model's dtype, built as the
model runner builds the sampler (``cpu_kernels.sampler_kernels``) and with torch's ops
(``SamplerKernels()``: a float32 copy, log_softmax, gather, topk; what the CPU ran before the
kernel and GPUs run), the two alternating; median ms of --repeats calls each. Checks that both
report the same chosen tokens and top values (up to float32 rounding) before timing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--top", type=int, nargs="+", default=[0, 5, 20])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--vocab", type=int, default=49152, help="SmolLM2's by default")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from scalellm.engine import cpu_kernels
    from scalellm.engine.sampler import Sampler, SamplerKernels

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels did not build here")
    samplers = {
        "torch ops": Sampler(cpu, SamplerKernels()),
        "kernel": Sampler(cpu, cpu_kernels.sampler_kernels(cpu)),
    }
    print(f"{platform.machine()} {platform.processor() or platform.platform()}, torch {torch.__version__}, "
          f"{args.threads} threads, vocabulary {args.vocab}")  # fmt: skip
    print("| dtype | rows | top | torch ops ms | kernel ms | speedup |")
    print("|---|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for dtype in args.dtypes:
        for rows in args.rows:
            logits = (torch.randn(rows, args.vocab, generator=gen) * 3).to(getattr(torch, dtype))
            tokens = torch.randint(0, args.vocab, (rows,), generator=gen)
            for k in args.top:
                a, b = (s.token_logprobs(logits, tokens, k) for s in samplers.values())
                assert [x.token_id for x in a] == [x.token_id for x in b]
                for x, y in zip(a, b, strict=True):
                    assert abs(x.logprob - y.logprob) < 1e-4
                    assert all(abs(u[1] - v[1]) < 1e-4 for u, v in zip(x.top, y.top, strict=True))
                times: dict[str, list[float]] = {name: [] for name in samplers}
                for repeat in range(args.repeats):
                    for name in sorted(samplers, reverse=repeat % 2 == 1):
                        start = time.perf_counter()
                        samplers[name].token_logprobs(logits, tokens, k)
                        times[name].append((time.perf_counter() - start) * 1e3)
                old, new = (statistics.median(times[n]) for n in samplers)
                print(f"| {dtype} | {rows} | {k} | {old:.2f} | {new:.2f} | {old / new:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
