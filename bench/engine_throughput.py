"""Offline engine throughput on the demo model, side by side with a transformers static batch.

    python bench/engine_throughput.py                 # 32 and 64 requests, 3 repeats each
    python bench/engine_throughput.py --num-requests 32 --repeats 1 --out results.json
    python bench/engine_throughput.py --device cuda --num-requests 64 256   # bfloat16 on a GPU

Workload: random prompts of 16-256 tokens and outputs of 16-128 tokens (seeded, EOS ignored).
Runs of ours and of the baseline are interleaved. Ours: ``LLM.generate`` with continuous batching. Baseline: what a transformers user writes, one
left-padded batch through ``model.generate`` (KV cache, eager attention) running until the longest
output is done. Both count only the tokens each request asked for. Both run on the same device in the same dtype
(the engine's auto choice unless --dtype says otherwise: bfloat16 on CUDA and on CPUs with native
bf16, float32 elsewhere); transformers uses eager attention
on CPU (its fastest there for this model) and SDPA on CUDA. The bound: the device's own measured
matmul peak in that dtype / (2 x parameters) tokens per second (a decode-step bound: it ignores
attention and the weight reads that dominate small batches on a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, vocab: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, 256))] for _ in range(n)]
    return Workload(prompts, [rng.randint(16, 128) for _ in range(n)])


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * size**3 / min(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(llm, work: Workload) -> list:  # type: ignore[no-untyped-def]
    """The workload through ``LLM.generate``: greedy, each request its own output length."""
    from scalellm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    return llm.generate([{"prompt_token_ids": p} for p in work.prompts], params)


def run_ours(llm, work: Workload) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    outs = generate(llm, work)
    elapsed = time.perf_counter() - t
    assert sum(len(o.outputs[0].token_ids) for o in outs) == work.output_tokens
    return elapsed


def generated(llm, work: Workload) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The token ids of the workload's greedy outputs."""
    return [list(o.outputs[0].token_ids) for o in generate(llm, work)]


def run_hf(model, work: Workload, pad_id: int) -> float:  # type: ignore[no-untyped-def]
    width = max(len(p) for p in work.prompts)
    ids = torch.full((len(work.prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(work.prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    sync(model.device)
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max(work.output_lens),
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad_id,
        )
    sync(model.device)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="HF folder (default: the prepared demo model)")
    parser.add_argument("--num-requests", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-repeats", type=int, default=1, help="0: skip the transformers baseline")
    parser.add_argument("--out", type=Path, default=None, help="write JSON results here")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, or auto (per device)")
    parser.add_argument(
        "--async-scheduling",
        action="store_true",
        help="also run a second engine with async_scheduling, interleaved with the first (same outputs "
        "checked): the overlap of the host's step work with the device's",
    )
    args = parser.parse_args()

    import transformers

    from scalellm import LLM
    from scalellm.models.prepare import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto_device if args.device == "auto" else args.device)
    from scalellm.engine.config import EngineConfig
    from scalellm.models.config import ModelConfig

    auto = EngineConfig(model=str(model_dir), device=str(device)).torch_dtype(
        ModelConfig.from_dir(model_dir).torch_dtype
    )
    dtype_name = args.dtype if args.dtype != "auto" else str(auto).removeprefix("torch.")
    dtype = getattr(torch, dtype_name)
    threads = torch.get_num_threads()
    # transformers first: on a GPU the engine then sizes its KV cache from what is left.
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa" if device.type == "cuda" else "eager"
    ).to(device)
    hf.eval()
    llm = LLM(
        model=str(model_dir),
        max_num_seqs=max(args.num_requests),
        device=str(device),
        dtype=dtype_name,
        gpu_memory_utilization=0.5,
    )
    overlapped = (
        LLM(
            model=str(model_dir),
            max_num_seqs=max(args.num_requests),
            device=str(device),
            dtype=dtype_name,
            gpu_memory_utilization=0.25,
            async_scheduling=True,
        )
        if args.async_scheduling
        else None
    )
    params = sum(p.numel() for p in hf.parameters())
    peak = matmul_peak_flops(device, dtype)
    bound = peak / (2 * params)
    vocab = llm.engine.model_config.vocab_size

    results = []
    for n in args.num_requests:
        work = make_workload(n, vocab, seed=n)
        run_ours(llm, make_workload(4, vocab, seed=999))  # warm-up
        if overlapped is not None:
            run_ours(overlapped, make_workload(4, vocab, seed=999))
            assert generated(overlapped, work) == generated(llm, work), "async scheduling changed the output"
        # Interleaved (ours, transformers, ours, ...) so that a change in the machine's load
        # during the run hits both sides alike.
        ours: list[float] = []
        base: list[float] = []
        ours_async: list[float] = []
        for i in range(max(args.repeats, args.hf_repeats)):
            if i < args.repeats:
                ours.append(run_ours(llm, work))
                if overlapped is not None:
                    ours_async.append(run_ours(overlapped, work))
            if i < args.hf_repeats:
                base.append(run_hf(hf, work, pad_id=0))
        ours_tps = work.output_tokens / statistics.median(ours)
        hf_tps = work.output_tokens / statistics.median(base) if base else float("nan")  # --hf-repeats 0
        results.append(
            dict(
                num_requests=n,
                output_tokens=work.output_tokens,
                prompt_tokens=sum(len(p) for p in work.prompts),
                ours_seconds=ours,
                hf_seconds=base,
                ours_tokens_per_s=ours_tps,
                hf_tokens_per_s=hf_tps,
                speedup=ours_tps / hf_tps,
                fraction_of_bound=ours_tps / bound,
                ours_async_seconds=ours_async,
                ours_async_tokens_per_s=work.output_tokens / statistics.median(ours_async)
                if ours_async
                else None,
            )
        )
        print(
            f"n={n}: ours {ours_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s, x{ours_tps / hf_tps:.2f}",
            flush=True,
        )
        if ours_async:
            async_tps = work.output_tokens / statistics.median(ours_async)
            print(
                f"n={n}: ours with async scheduling {async_tps:.1f} tok/s, x{async_tps / ours_tps:.2f} of ours"
            )

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    machine = f"{where}, {dtype_name}, {threads} torch threads, torch {torch.__version__}"
    print(
        f"\nmachine: {machine}; matmul peak {peak / 1e12:.2f} TFLOP/s; bound {bound:.0f} tok/s ({params / 1e6:.1f}M params)\n"
    )
    print("| requests | output tokens | ours tok/s | transformers tok/s | speedup | ours / matmul bound |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['num_requests']} | {r['output_tokens']} | {r['ours_tokens_per_s']:.1f} | "
            f"{r['hf_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {100 * r['fraction_of_bound']:.1f}% |"
        )
    if args.out:
        summary = dict(
            machine=machine, matmul_peak_flops=peak, params=params, bound_tokens_per_s=bound, runs=results
        )
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
