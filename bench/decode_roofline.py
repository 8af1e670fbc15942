"""How close a decode step comes to the device's memory bound, on an 8B-shaped Llama.

    python bench/decode_roofline.py [--shape 8b|tiny] [--device cuda] [--batch 1 16 64 256]
        [--context 512] [--steps 20] [--prefill 2048] [--graphs off on] [--json OUT]

The model is Llama-3-8B's shape with random weights drawn on the device (models/loader.py
random_model; no checkpoint), run by the engine's ModelRunner: the attention backend, cache
layout and step preparation are the engine's. For each batch size B, B sequences sit at
--context tokens of (zeroed) cache and one decode step is repeated at that position: its time
is ModelRunner.run_steps (input preparation, forward, logits) plus a greedy argmax, the median of
--steps after warm-up, each step closed by a device synchronize. Each batch size runs once per
--graphs mode: off (EngineConfig.cuda_graph_max_batch 0: eager steps) and on (the largest batch:
pure-decode steps replay the CUDA graph of their bucket, engine/cuda_graphs.py; on CPU the same
bucketed static buffers without capture), one runner after the other over the same weights.
Reported per batch size and mode:

    ms/step, tokens/s (B / step time)
    roofline = (weight bytes + KV bytes read) / step time / copy bandwidth
        weight bytes: every parameter but the embedding table (B rows of it), lm_head included
        KV bytes: B x (context + 1) tokens x layers x K and V x kv heads x head_dim x element
        copy bandwidth: measured here, a large device-to-device copy (bytes read + written / time)
    prepare ms: ModelRunner.prepare alone (the host's share: lists to one device tensor)
    kernel ms/step: the kernels' summed device time in one profiled step (CUDA)
    launches/step: CUDA kernels in one profiled step (torch.profiler: the kernels of a graph
        replay count one by one where the profiler reports them so); CPU: none
    host launches/step: the host's kernel launch calls in that step (cudaLaunchKernel,
        cuLaunchKernel, ...; a graph replay is one cudaGraphLaunch); CPU: none
    torch ops/step: aten ops the profiler saw in that step (both devices)
    loop ms, async loop ms: ms per step of --steps steps run back to back as LLMEngine.step runs
        them (loop_seconds; the scheduler aside), each step's tokens read on the host and fed to
        the next: synchronously, and with async scheduling (the next step launched before this
        one's tokens are read); async roofline: the roofline at the async loop's step time

and one --prefill-token prefill: its matmul FLOPs (2 x non-embedding weights x tokens, plus the
causal attention) over its time, against the bf16 (or --dtype) matmul peak measured here.
The prefill runs on the first mode's runner. Prints a markdown table; --json writes every figure. ``--shape tiny --device cpu`` runs the same
code in seconds (tests/unit/test_decode_roofline.py); its figures check the code, not the CPU
(its "peak" is one 512-wide torch matmul, which the engine's own CPU kernels can beat).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scalellm.engine.config import EngineConfig  # noqa: E402
from scalellm.engine.model_runner import LaunchedStep, ModelRunner  # noqa: E402
from scalellm.engine.request import Request, RequestStatus  # noqa: E402
from scalellm.engine.scheduler import ScheduledRequest  # noqa: E402
from scalellm.engine.step_inputs import SeqStep  # noqa: E402
from scalellm.models.config import ModelConfig  # noqa: E402
from scalellm.models.loader import random_model  # noqa: E402
from scalellm.models.quant_linear import weight_bytes as model_weight_bytes  # noqa: E402
from scalellm.types import SamplingParams  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "8b": {  # Llama-3-8B
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
    },
}
BLOCK_SIZE = 16


def model_config(shape: str) -> ModelConfig:
    raw = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", **SHAPES[shape]}
    return ModelConfig.from_dict(raw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy, counting the bytes read and written."""
    size = 2 << 30 if device.type == "cuda" else 64 << 20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, repeats=10, warmup=3)
    return 2 * size / seconds


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype``."""
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = median_seconds(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * n**3 / seconds


def weight_bytes(runner: ModelRunner, batch: int) -> int:
    """Bytes of weights a step of ``batch`` tokens reads: the model's weights (quant_linear's
    count), less the embedding table's rows it does not look up (when lm_head is not tied to it)."""
    total = model_weight_bytes(runner.model)
    embed = runner.model.embed_tokens.weight
    if not runner.model_config.tie_word_embeddings:
        total -= embed.numel() * embed.element_size()
        total += batch * embed.shape[1] * embed.element_size()
    return total


def kv_bytes(runner: ModelRunner, batch: int, context: int) -> int:
    cfg = runner.model_config
    per_token = cfg.num_layers * 2 * runner.num_kv_heads * cfg.head_dim * runner.kv_cache.element_size()
    return batch * (context + 1) * per_token


def decode_steps(batch: int, context: int, vocab: int) -> list[SeqStep]:
    """B sequences at ``context`` cached tokens, each decoding its next one (disjoint blocks)."""
    per_seq = -(-(context + 1) // BLOCK_SIZE)
    return [
        SeqStep(context, [(7 * i + 1) % vocab], list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)), True)
        for i in range(batch)
    ]


def loop_seconds(
    runner: ModelRunner, batch: int, context: int, steps: int, warmup: int, overlap: bool
) -> float:
    """Seconds per decode step when steps follow each other as LLMEngine.step runs them (the
    scheduler's own work aside): each step's tokens read on the host and fed to the next step.
    ``overlap`` False: the host waits for a step's tokens before it launches the next (the
    synchronous engine); True: it launches the next step's forward pass first, its rows fed from
    this step's tokens on the device, reads this step's tokens while that one runs, then samples
    the next (async_scheduling).
    Each sequence moves one position a step from ``context``: the blocks hold
    context + warmup + steps + 1 tokens."""
    per_seq = -(-(context + warmup + steps + 1) // BLOCK_SIZE)
    vocab = runner.model_config.vocab_size
    params = SamplingParams(temperature=0.0, ignore_eos=True)
    reqs = []
    for i in range(batch):
        req = Request(f"s{i}", [(7 * i + t) % vocab for t in range(context + 1)], params, max_tokens=1 << 20)
        req.block_ids = list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))
        req.num_computed_tokens = context  # the first step feeds prompt token ``context``
        req.status = RequestStatus.RUNNING
        reqs.append(req)
    scheduled = [ScheduledRequest(req, 1) for req in reqs]
    previous: LaunchedStep | None = None
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync(runner.device)
            start = time.perf_counter()
        ran = runner.forward(scheduled, previous if overlap else None)
        if overlap and previous is not None:
            for req, token in zip(previous.requests, previous.output().token_ids, strict=True):
                req.fill_pending(token)
        launched = runner.sample(ran)
        for req in reqs:
            req.num_computed_tokens += 1
        if overlap:
            for req in reqs:
                req.append_pending()
            previous = launched
        else:
            for req, token in zip(reqs, launched.output().token_ids, strict=True):
                req.append_token(token)
    if previous is not None:
        previous.output()  # the last timed step's tokens
    return (time.perf_counter() - start) / steps


def prefill_flops(cfg: ModelConfig, tokens: int) -> int:
    """Matmul FLOPs of one prefill: every token through every layer's projections, the causal
    attention (QK^T and PV over the lower triangle), and lm_head for the last token only (the
    runner computes logits of sampling rows)."""
    h, d, q, kv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    per_layer = h * (q + 2 * kv) * d + q * d * h + 3 * h * cfg.intermediate_size
    attention = 2 * cfg.num_layers * q * d * tokens * (tokens + 1)
    return 2 * cfg.num_layers * per_layer * tokens + attention + 2 * h * cfg.vocab_size


class StepProfile(NamedTuple):
    """What one profiled step ran (see profile_step)."""

    launches: int | None  # CUDA kernels (None off CUDA)
    host_launches: int | None  # the host's launch calls (None off CUDA)
    ops: int  # top-level aten ops
    busy_ms: float | None  # the kernels' summed device time (None off CUDA)
    top: list[tuple[str, float]]  # the 8 costliest kernels (CUDA) or aten ops (CPU), us in the step


def profile_step(step: Callable[[], object], device: torch.device) -> StepProfile:
    """Kernels, launch calls, aten ops and where the time went in one step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None)
    costs: dict[str, float] = {}
    if not cuda:
        for e in events:
            if e.name.startswith("aten::"):
                costs[e.name] = costs.get(e.name, 0.0) + e.self_cpu_time_total
        return StepProfile(None, None, ops, None, _top(costs))
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in kernels:
        costs[e.name[:80]] = costs.get(e.name[:80], 0.0) + e.device_time_total
    host = sum(1 for e in events if "LaunchKernel" in e.name or e.name == "cudaGraphLaunch")
    return StepProfile(len(kernels), host, ops, sum(costs.values()) / 1e3, _top(costs))


def _top(costs: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(costs.items(), key=lambda kv: -kv[1])[:8]


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = model_config(args.shape)
    max_len = max(args.context + 1, args.prefill)
    decode_blocks = max(args.batch) * -(-(args.context + args.warmup + args.steps + 1) // BLOCK_SIZE)
    prefill_blocks = -(-args.prefill // BLOCK_SIZE)
    config = EngineConfig(
        device=args.device,
        dtype=args.dtype,
        block_size=BLOCK_SIZE,
        num_kv_blocks=1 + max(decode_blocks, prefill_blocks),  # block 0 is never used
        max_model_len=max_len,
        max_num_seqs=max(args.batch),
    )
    bandwidth = copy_bandwidth(device)
    peak = matmul_peak(device, dtype)
    model = random_model(cfg, dtype, device, max_len)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "matmul_peak_tflops": peak / 1e12,
        "context": args.context,
        "graphs": {},
        "decode": [],
    }
    for mode in args.graphs:  # one runner per mode; a mode that fails is reported, the next runs
        limit = max(args.batch) if mode == "on" else 0
        runner = None
        try:
            runner = ModelRunner(replace(config, cuda_graph_max_batch=limit), cfg, max_len, model=model)
            result["attention"] = runner.attention.name
            buckets = None if runner.graphs is None else {"buckets": list(runner.graphs.buckets)}
            result["graphs"][mode] = buckets
            result["decode"] += decode_rows(args, runner, mode, bandwidth)
            if "prefill" not in result:
                result["prefill"] = prefill_row(args, runner, peak)
        except Exception:
            result.setdefault("errors", {})[mode] = traceback.format_exc()
            print(f"graphs {mode} failed:\n{result['errors'][mode]}", file=sys.stderr, flush=True)
        finally:
            if runner is not None:
                runner.close()
            del runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def decode_rows(
    args: argparse.Namespace, runner: ModelRunner, mode: str, bandwidth: float
) -> list[dict[str, Any]]:
    """One row per batch size: a decode step at --context, timed and profiled."""
    rows = []
    for batch in args.batch:
        steps = decode_steps(batch, args.context, runner.model_config.vocab_size)

        def step(steps: list[SeqStep] = steps) -> object:
            _, logits = runner.run_steps(steps)
            assert logits is not None
            return logits.argmax(dim=-1)

        replays = runner.graphs.replays if runner.graphs is not None else 0
        seconds = median_seconds(step, runner.device, args.steps, args.warmup)
        bucketed = runner.graphs is not None and runner.graphs.replays > replays

        def prepare_only(steps: list[SeqStep] = steps) -> object:
            return runner.prepare(steps)

        prepare = median_seconds(prepare_only, runner.device, args.steps, 1)
        prof = profile_step(step, runner.device)
        moved = weight_bytes(runner, batch) + kv_bytes(runner, batch, args.context)
        loops = {
            overlap: loop_seconds(runner, batch, args.context, args.steps, args.warmup, overlap)
            for overlap in (False, True)
        }
        row = {
            "batch": batch,
            "graphs": mode,
            "bucketed": bucketed,
            "ms_per_step": seconds * 1e3,
            "tokens_per_s": batch / seconds,
            "bytes_per_step": moved,
            "roofline": moved / seconds / bandwidth,
            "launches_per_step": prof.launches,
            "host_launches_per_step": prof.host_launches,
            "torch_ops_per_step": prof.ops,
            "kernel_ms_per_step": prof.busy_ms,
            "prepare_ms": prepare * 1e3,
            "loop_ms_per_step": loops[False] * 1e3,
            "async_loop_ms_per_step": loops[True] * 1e3,
            "async_loop_roofline": moved / loops[True] / bandwidth,
            "top": prof.top,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def prefill_row(args: argparse.Namespace, runner: ModelRunner, peak: float) -> dict[str, Any]:
    cfg = runner.model_config
    blocks = -(-args.prefill // BLOCK_SIZE)
    tokens = [(3 * i + 1) % cfg.vocab_size for i in range(args.prefill)]
    prefill = [SeqStep(0, tokens, list(range(1, 1 + blocks)), True)]
    seconds = median_seconds(lambda: runner.run_steps(prefill), runner.device, repeats=3, warmup=1)
    flops = prefill_flops(cfg, args.prefill)
    return {
        "tokens": args.prefill,
        "ms": seconds * 1e3,
        "tflops": flops / seconds / 1e12,
        "of_matmul_peak": flops / seconds / peak,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['shape']} on {result['device']} ({result['dtype']}, {result.get('attention')}), "
        f"{result['date']}: copy {result['copy_bandwidth_gb_s']:.0f} GB/s, "
        f"matmul {result['matmul_peak_tflops']:.3g} TFLOP/s, context {result['context']}",
        "",
        "| batch | graphs | ms/step | kernel ms | prepare ms | tok/s | roofline | launches/step "
        "| host launches/step | torch ops/step | loop ms | async loop ms | async roofline |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["decode"]:
        launches, host = (
            "-" if row[key] is None else str(row[key])
            for key in ("launches_per_step", "host_launches_per_step")
        )
        kernel_ms = "-" if row["kernel_ms_per_step"] is None else f"{row['kernel_ms_per_step']:.2f}"
        graphs = row["graphs"] + ("" if row["bucketed"] or row["graphs"] == "off" else " (eager)")
        lines.append(
            f"| {row['batch']} | {graphs} | {row['ms_per_step']:.2f} | {kernel_ms} | {row['prepare_ms']:.2f} "
            f"| {row['tokens_per_s']:.0f} | "
            f"{100 * row['roofline']:.3g}% | {launches} | {host} | {row['torch_ops_per_step']} | "
            f"{row['loop_ms_per_step']:.2f} | {row['async_loop_ms_per_step']:.2f} | "
            f"{100 * row['async_loop_roofline']:.3g}% |"
        )
    p = result.get("prefill")
    if p is not None:
        lines += [
            "",
            f"prefill {p['tokens']} tokens: {p['ms']:.1f} ms, {p['tflops']:.3g} TFLOP/s, "
            f"{100 * p['of_matmul_peak']:.3g}% of the matmul peak",
        ]
    for mode in result.get("errors", {}):
        lines.append(f"\ngraphs {mode}: FAILED (the JSON's errors hold the traceback)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=512, help="cached tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per batch size")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=2048, help="tokens of the one prefill timed")
    parser.add_argument(
        "--graphs",
        choices=["off", "on"],
        nargs="+",
        default=["off", "on"],
        help="decode graph modes, in order",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    with torch.inference_mode():
        result = run(args)
    print(table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result.get("errors"):
        sys.exit(1)


if __name__ == "__main__":
    main()
