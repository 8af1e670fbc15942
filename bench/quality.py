"""Quality, memory and decode speed of the compression modes, side by side on one model.

    python bench/quality.py                          # demo model, the engine's dtype, all modes
    python bench/quality.py --dtype float32 --out quality.json

Modes: weights none | int8 | w8a8, KV cache auto | int8 (the pairs in MODES), each its own ModelRunner.

Quality, teacher-forced: each paragraph of bench/data/quality_text.txt is one sequence; its first
``--prefill`` tokens go in as one prefill, every later token as a decode step that reads the
whole context back from the paged cache (so an int8 cache's error is in every scored token). The
paragraphs run as one decode batch. Scored: the log-probability of each next token (perplexity
= exp(-mean)) and whether its argmax equals the reference mode's (weights none, KV auto).
Free-running greedy: ``LLM.generate`` on each paragraph's first sentence, and the fraction of
generated tokens identical to the reference's, position by position, up to the first difference.

Memory: weight bytes (quant_linear.weight_bytes: parameters, int8 buffers, oneDNN-packed
copies) and KV bytes per token. Speed: the median of decode steps (every row's logits included)
of a batch of 1 and of 64 streams (``--speed-batches``) at a context of 128 tokens (``--speed-contexts``),
modes interleaved round by round.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scalellm import LLM
from scalellm.engine.config import EngineConfig
from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.request import Request
from scalellm.engine.scheduler import ScheduledRequest
from scalellm.engine.step_inputs import SeqStep
from scalellm.models.config import ModelConfig
from scalellm.models.prepare import resolve_model_dir
from scalellm.models.quant_linear import weight_bytes
from scalellm.text import Tokenizer
from scalellm.types import SamplingParams

TEXT = Path(__file__).parent / "data" / "quality_text.txt"
MODES = (("none", "auto"), ("int8", "auto"), ("w8a8", "auto"), ("none", "int8"), ("int8", "int8"))


@dataclass
class Scores:
    logprobs: list[float]
    argmax: list[int]

    @property
    def perplexity(self) -> float:
        return math.exp(-statistics.fmean(self.logprobs))


def make_runner(
    model_dir: Path, dtype: str, quantization: str, kv: str, max_len: int, kv_cache_gb: float = 0.25
) -> ModelRunner:
    config = EngineConfig(
        model=str(model_dir),
        dtype=dtype,
        quantization=quantization,
        kv_cache_dtype=kv,
        kv_cache_gb=kv_cache_gb,
    )
    return ModelRunner(config, ModelConfig.from_dir(model_dir), max_len)


def _requests(sequences: list[list[int]], block_size: int) -> list[Request]:
    """One request per sequence over consecutive blocks (as the block manager would hand out)."""
    reqs, next_block = [], 0
    for i, ids in enumerate(sequences):
        req = Request(f"q{i}", ids, SamplingParams(), max_tokens=1)
        nb = -(-len(ids) // block_size)
        req.block_ids = list(range(next_block, next_block + nb))
        next_block += nb
        reqs.append(req)
    return reqs


@torch.inference_mode()
def _run(runner: ModelRunner, scheduled: list[ScheduledRequest]) -> torch.Tensor:
    """One step; the float32 log-softmax of every fed token's logits."""
    inputs = runner.prepare([SeqStep.of(s) for s in scheduled])
    hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.meta)
    return torch.log_softmax(runner.model.compute_logits(hidden), dim=-1)


def score(runner: ModelRunner, sequences: list[list[int]], prefill: int) -> Scores:
    """Teacher-forced next-token log-probabilities and argmaxes, in sequence-major order."""
    reqs = _requests(sequences, runner.block_size)
    per_seq: list[list[tuple[float, int]]] = [[] for _ in reqs]

    def record(i: int, logprobs: torch.Tensor, positions: range) -> None:
        ids = sequences[i]
        for row, pos in zip(logprobs, positions, strict=True):
            if pos + 1 < len(ids):
                per_seq[i].append((row[ids[pos + 1]].item(), int(row.argmax())))

    for i, req in enumerate(reqs):
        record(i, _run(runner, [ScheduledRequest(req, prefill)]), range(prefill))
        req.num_computed_tokens = prefill
    for pos in range(prefill, max(map(len, sequences)) - 1):
        live = [i for i, ids in enumerate(sequences) if pos < len(ids) - 1]
        logprobs = _run(runner, [ScheduledRequest(reqs[i], 1) for i in live])
        for row, i in enumerate(live):
            record(i, logprobs[row : row + 1], range(pos, pos + 1))
            reqs[i].num_computed_tokens += 1
    flat = [x for seq in per_seq for x in seq]
    return Scores([lp for lp, _ in flat], [a for _, a in flat])


def decode_step_times(
    runners: dict[str, ModelRunner], batch: int, context: int, rounds: int
) -> dict[str, float]:
    """Median seconds of one decode step of ``batch`` streams at ``context`` tokens, modes interleaved."""
    sequences = [[(7 * i + j) % 1000 + 100 for j in range(context + rounds + 1)] for i in range(batch)]
    state = {}
    for name, runner in runners.items():
        reqs = _requests(sequences, runner.block_size)
        for req in reqs:
            _run(runner, [ScheduledRequest(req, context)])
            req.num_computed_tokens = context
        state[name] = reqs
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            step = [ScheduledRequest(r, 1) for r in state[name]]
            start = time.perf_counter()
            _run(runner, step)  # every row's logits, as a sampling decode step computes them
            times[name].append(time.perf_counter() - start)
            for r in state[name]:
                r.num_computed_tokens += 1
    return {name: statistics.median(t) for name, t in times.items()}


def greedy_texts(
    model_dir: Path, dtype: str, quantization: str, kv: str, prompts: list[str], n: int
) -> list[list[int]]:
    llm = LLM(
        model=str(model_dir), dtype=dtype, quantization=quantization, kv_cache_dtype=kv, kv_cache_gb=0.25
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _speed_key(batch: int, context: int) -> str:
    """A result's key for decode steps of ``batch`` streams at ``context`` tokens (128: as before)."""
    return f"decode_ms_b{batch}" + ("" if context == 128 else f"_c{context}")


def progress(stage: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prefill", type=int, default=16)
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--speed-batches", type=int, nargs="*", default=[1, 64], help="none: skip speed")
    parser.add_argument("--speed-contexts", type=int, nargs="+", default=[128], help="cached tokens a stream")
    parser.add_argument(
        "--kv-cache-gb", type=float, default=0.25, help="each runner's (64 x 1024 tokens: 1.6 bf16)"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=[f"{q}/{kv}" for q, kv in MODES],
        help="weights/kv pairs; none/auto first",
    )
    args = parser.parse_args()
    modes = [tuple(m.split("/")) for m in args.modes]

    model_dir = resolve_model_dir(args.model)
    tokenizer = Tokenizer.from_dir(model_dir)
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if p.strip()]
    sequences = [tokenizer.encode(p) for p in paragraphs]
    max_len = max(*map(len, sequences), *args.speed_contexts) + 256
    runners = {
        f"{q}/{kv}": make_runner(model_dir, args.dtype, q, kv, max_len, args.kv_cache_gb) for q, kv in modes
    }
    ref_name = "none/auto"
    results: dict[str, dict[str, float]] = {}
    progress("runners loaded")
    scores = {name: score(runner, sequences, args.prefill) for name, runner in runners.items()}
    progress("teacher-forced scores")
    first_sentences = [p.split(". ")[0] + "." for p in paragraphs]
    greedy = {
        f"{q}/{kv}": greedy_texts(model_dir, args.dtype, q, kv, first_sentences, args.greedy_tokens)
        for q, kv in modes
    }
    progress("greedy generations")
    speeds = {
        (b, c): decode_step_times(runners, b, c, args.rounds)
        for c in args.speed_contexts
        for b in args.speed_batches
    }
    progress("decode steps")
    ref = scores[ref_name]
    for name, runner in runners.items():
        s = scores[name]
        agree = statistics.fmean(a == b for a, b in zip(s.argmax, ref.argmax, strict=True))
        same = sum(common_prefix(g, r) for g, r in zip(greedy[name], greedy[ref_name], strict=True))
        results[name] = {
            "perplexity": s.perplexity,
            "ppl_vs_ref_pct": 100 * (s.perplexity / ref.perplexity - 1),
            "top1_agreement_pct": 100 * agree,
            "greedy_prefix_match_pct": 100 * same / sum(map(len, greedy[ref_name])),
            "weight_mb": weight_bytes(runner.model) / 1e6,
            "kv_bytes_per_token": runner.bytes_per_block / runner.block_size,
            **{_speed_key(b, c): 1e3 * t[name] for (b, c), t in speeds.items()},
        }
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "dtype": str(next(iter(runners.values())).dtype),
        "scored_tokens": len(ref.logprobs),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    print(
        "mode (weights/kv) | ppl | vs ref | top-1 agree | greedy match | weights MB | KV B/token | decode ms"
    )
    for name, r in results.items():
        steps = ", ".join(f"b{b} c{c} {r[_speed_key(b, c)]:.1f}" for b, c in speeds)
        print(
            f"{name} | {r['perplexity']:.3f} | {r['ppl_vs_ref_pct']:+.2f}% | {r['top1_agreement_pct']:.1f}% | "
            f"{r['greedy_prefix_match_pct']:.1f}% | {r['weight_mb']:.0f} | {r['kv_bytes_per_token']:.0f} | {steps}"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
