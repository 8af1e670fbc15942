"""What the sampler's logits controls cost per step, side by side with the plain sampler, on the
demo model's vocabulary (49152) on CPU.

    python bench/sampler_controls.py                      # batches of 1, 8 and 32, 30 repeats
    python bench/sampler_controls.py --batch 64 --repeats 50

Rows per batch size, all in one run with the kinds interleaved:
  plain      half greedy, half temperature/top-p requests with no controls (the fast path)
  check      LogitsControls alone on that plain batch: what the fast path adds to every step
  penalties  presence + frequency + repetition penalties, logit_bias and a bad word on every
             request, 512-token prompts and 256-token outputs
  grammar    a JSON schema on every request, each matcher part-way through an object (its state
             does not advance between repeats: bench/grammar_engines.py measures advancing walks)
The controlled kinds share the plain kind's greedy / top-p mix. The sampler is built as the
model runner builds it (the CPU kernels' argmax and draw where they are built). Medians of the
repeats, in microseconds per sampler call.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch

from scalellm.engine import cpu_kernels
from scalellm.engine.grammar import GrammarCompiler
from scalellm.engine.logits_controls import LogitsControls
from scalellm.engine.request import Request
from scalellm.engine.sampler import Sampler
from scalellm.types import SamplingParams, StructuredOutput

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def requests(kind: str, batch: int, compiler: GrammarCompiler, rng: random.Random) -> list[Request]:
    out = []
    for i in range(batch):
        greedy = i % 2 == 0
        base = SamplingParams(
            temperature=0.0 if greedy else 0.8, top_p=1.0 if greedy else 0.9, max_tokens=None
        )
        prompt = [rng.randrange(VOCAB) for _ in range(512 if kind == "penalties" else 16)]
        output = [rng.randrange(VOCAB) for _ in range(256)] if kind == "penalties" else []
        if kind == "penalties":
            params = SamplingParams(
                temperature=base.temperature, top_p=base.top_p, max_tokens=None, presence_penalty=0.5,
                frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={7: 2.0, 99: -3.0},
                bad_words_token_ids=[(output[-1], 11)],
            )  # fmt: skip
        elif kind == "grammar":
            params = SamplingParams(
                temperature=base.temperature,
                max_tokens=None,
                structured_output=StructuredOutput.json_schema(SCHEMA),
            )
        else:
            params = base
        req = Request(f"{kind}-{i}", prompt, params, max_tokens=10_000, eos_token_ids=frozenset({2}))
        if kind == "grammar":
            req.grammar = compiler.compile(params.structured_output).matcher()  # type: ignore[arg-type]
            output = compiler._llg_tokenizer().tokenize_str('{"name":"Ada Lovelace","age":3')
        for t in output:
            req.append_token(t)
        out.append(req)
    return out


def timed(
    fn: Callable[[torch.Tensor, list[Request]], object], logits: torch.Tensor, reqs: list[Request]
) -> float:
    t = time.perf_counter()
    fn(logits, reqs)
    return time.perf_counter() - t


def main() -> None:
    from scalellm.models.prepare import resolve_model_dir

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compiler = GrammarCompiler(resolve_model_dir(None), VOCAB, [2])
    rng = random.Random(0)
    print(f"{platform.machine()} {platform.processor() or platform.platform()}, torch {torch.__version__}, "
          f"{args.threads} threads, vocabulary {VOCAB}")  # fmt: skip
    print("| batch | plain us | check us (share of plain) | penalties us (x plain) | grammar us (x plain) |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        cpu = torch.device("cpu")
        sampler = Sampler(cpu, cpu_kernels.sampler_kernels(cpu))
        controls = LogitsControls()
        reqs = {k: requests(k, batch, compiler, rng) for k in ("plain", "penalties", "grammar")}
        logits = torch.randn(batch, VOCAB) * 3
        times: dict[str, list[float]] = {k: [] for k in ("plain", "check", "penalties", "grammar")}
        for _ in range(args.repeats):
            times["plain"].append(timed(sampler, logits, reqs["plain"]))
            times["check"].append(timed(controls, logits, reqs["plain"]))
            times["penalties"].append(timed(sampler, logits, reqs["penalties"]))
            times["grammar"].append(timed(sampler, logits, reqs["grammar"]))
        med = {k: 1e6 * statistics.median(v) for k, v in times.items()}
        print(
            f"| {batch} | {med['plain']:.0f} | {med['check']:.1f} ({100 * med['check'] / med['plain']:.2f}%) "
            f"| {med['penalties']:.0f} ({med['penalties'] / med['plain']:.1f}x) "
            f"| {med['grammar']:.0f} ({med['grammar'] / med['plain']:.1f}x) |"
        )


if __name__ == "__main__":
    main()
