"""The sampler's cost per step for sampled requests, this tree against an older revision's sampler,
on the demo model's own next-token logits.

    python bench/sampler_truncation.py --baseline-rev HEAD~1 [--batch 1 8 64] [--repeats 30] [--path torch]

Logits: the demo model (transformers, float32) teacher-forced over bench/data/quality_text.txt,
one row per position, the first B rows for a batch of B (bfloat16, as the engine hands them
over). Kinds of request, every row of a batch alike: temperature 1.0 alone (no truncation),
temperature 0.7 with top-p 0.9, top-p 0.95 at temperature 1.0, top-k 50 at temperature 0.8. The
baseline is ``scalellm/engine/sampler.py`` as it was at --baseline-rev, loaded beside the
current one (its imports are this tree's) and built as the model runner builds it (with the CPU
kernels' argmax and, --path kernel, their draw, csrc/sample.cpp; --path torch: the torch path);
the two run interleaved, each first in every other repeat. Prints the median ms per sampler call
and, for the current tree's torch path, how many of the rows' top-p truncations stopped at each
width (engine/sampler.py's CANDIDATES rungs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = {
    "t=1.0": {"temperature": 1.0},
    "t=0.7 top_p=0.9": {"temperature": 0.7, "top_p": 0.9},
    "t=1.0 top_p=0.95": {"temperature": 1.0, "top_p": 0.95},
    "t=0.8 top_k=50": {"temperature": 0.8, "top_k": 50},
}


def baseline_sampler(rev: str, folder: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:scalellm/engine/sampler.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "sampler_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sampler_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def model_logits(rows: int) -> torch.Tensor:
    """[rows, vocab] next-token logits of the demo model over the quality text, in bfloat16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scalellm.models.prepare import resolve_model_dir

    folder = resolve_model_dir(None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = (ROOT / "bench" / "data" / "quality_text.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :rows]
    with torch.inference_mode():
        logits = model(ids).logits[0]
    if len(logits) < rows:
        raise SystemExit(f"the text gives {len(logits)} positions, fewer than {rows}")
    return logits.to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--path", choices=["kernel", "torch"], default="kernel")
    args = parser.parse_args()

    from scalellm.engine import cpu_kernels
    from scalellm.engine import sampler as current
    from scalellm.engine.request import Request
    from scalellm.types import SamplingParams

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = baseline_sampler(args.baseline_rev, Path(tmp))
    logits = model_logits(max(args.batch))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    widths: Counter[int] = Counter()
    real_truncate = current.truncate
    kernels = cpu_kernels.sampler_kernels(cpu)
    if args.path == "torch":
        kernels = dataclasses.replace(kernels, sample_rows=None)

    def counting(logits: torch.Tensor, top_k: list[int], top_p: list[float], width: int) -> object:
        probs, ids, complete = real_truncate(logits, top_k, top_p, width)
        widths.update([width] * int(complete.sum()))
        return probs, ids, complete

    for kind, params in KINDS.items():
        for batch in args.batch:
            reqs = [
                Request(f"{kind}-{i}", [1], SamplingParams(max_tokens=8, **params), 8) for i in range(batch)
            ]
            rows = logits[:batch]
            samplers = {
                f"baseline ({args.baseline_rev})": baseline.Sampler(cpu),
                "current": current.Sampler(cpu, kernels),
            }
            times: dict[str, list[float]] = {name: [] for name in samplers}
            for repeat in range(args.repeats):
                for name in sorted(samplers, reverse=repeat % 2 == 1):
                    start = time.perf_counter()
                    samplers[name](rows, reqs)
                    times[name].append((time.perf_counter() - start) * 1e3)
            widths.clear()
            current.truncate = counting  # type: ignore[assignment]
            samplers["current"](rows, reqs)
            current.truncate = real_truncate
            (old, new) = (statistics.median(times[name]) for name in samplers)
            stops = ", ".join(f"{w}: {n}" for w, n in sorted(widths.items())) or "-"
            print(f"{kind:18s} batch {batch:3d}: baseline {old:8.2f} ms, current {new:7.2f} ms "
                  f"({old / new:5.1f}x); rows stopped at width {stops}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
