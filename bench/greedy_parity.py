"""Greedy agreement between the engine and transformers on one device and dtype.

    python bench/greedy_parity.py --model FOLDER --device cuda --dtype bfloat16

Random prompts (seeded), greedy, EOS ignored. transformers runs one prompt at a time (no padding,
its default attention, SDPA); the engine runs them all as one continuously batched workload. In float32 the
continuations must be identical (the test suite asserts that on CPU, and on CUDA with
SCALELLM_TEST_DEVICE=cuda). In bfloat16 the two use different kernels and reduction orders, so a
near-tie in the logits can flip a token and everything after it: this reports how many
continuations match exactly and, for the others, where they first differ.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tiny_models import hf_greedy  # noqa: E402


def engine_continuations(
    model_dir: Path, prompts: list[list[int]], max_tokens: int, device: str, dtype: str
) -> list[list[int]]:
    from scalellm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir),
        device=device,
        dtype=dtype,
        max_num_seqs=len(prompts),
        gpu_memory_utilization=0.3,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(8, 200))] for _ in range(args.prompts)]
    theirs = hf_greedy(args.model, prompts, args.max_tokens, args.device, getattr(torch, args.dtype))
    ours = engine_continuations(args.model, prompts, args.max_tokens, args.device, args.dtype)
    firsts = [first_difference(a, b) for a, b in zip(ours, theirs, strict=True)]
    same = sum(f is None for f in firsts)
    differing = [f for f in firsts if f is not None]
    where = (
        f"; first difference at token {statistics.median(differing):.0f} (median), {min(differing)} (earliest)"
        if differing
        else ""
    )
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(
        f"{name}, {args.dtype}: {same}/{len(prompts)} greedy continuations of {args.max_tokens} tokens "
        f"identical to transformers{where}"
    )
    return 0 if same == len(prompts) or args.dtype != "float32" else 1


if __name__ == "__main__":
    sys.exit(main())
