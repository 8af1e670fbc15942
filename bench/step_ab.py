"""The engine's decode step, this tree against an older revision, in alternating processes.

    python bench/step_ab.py --baseline-rev HEAD~3 [--batch 1 64] [--dtypes bfloat16 float32] [--rounds 3]
        [--model FOLDER] [--prompt-len 128] [--sampling T P] [--logprobs N] [--seeded]

The baseline revision is exported with ``git archive`` into a temporary folder, the working
tree (committed or not) copied beside it. Each round runs
one process per tree (the order alternates between rounds) on one torch thread; each process
builds an engine on the demo model (or --model), starts B requests of --prompt-len tokens, lets them all decode,
then times --steps pure decode steps (``LLMEngine.step``; greedy, or sampled with --sampling's
temperature and top-p; every request with --logprobs top logprobs, a seed of its own with
--seeded): wall time and the CPU time of the
stepping thread (one torch thread runs the whole step in it, so CPU time is what the step costs,
whatever else preempts it on a shared machine). The summary gives, per tree and setting, the
median over rounds of the per-process medians, and the ratio; on a loaded machine read the CPU
time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_steps(
    tree: Path,
    dtype: str,
    batches: list[int],
    steps: int,
    model: str | None,
    prompt_len: int,
    sampling: tuple[float, float],
    logprobs: int | None,
    seeded: bool,
) -> dict[str, list[float]]:
    """In a child process whose imports come from ``tree``: median wall and CPU ms per decode step,
    by batch."""
    sys.path.insert(0, str(tree))
    import torch

    from scalellm.engine.config import EngineConfig
    from scalellm.engine.engine import LLMEngine
    from scalellm.types import SamplingParams

    torch.set_num_threads(1)
    top = max(batches)
    blocks_each = -(-(prompt_len + 4 * top + steps + 64) // 16) + 1  # 16-token blocks
    config = EngineConfig(
        model=model,
        device="cpu",
        dtype=dtype,
        max_num_seqs=top,
        num_kv_blocks=top * blocks_each,
        num_threads=1,
    )
    engine = LLMEngine(config)
    result = {}
    for batch in batches:
        # No request may end before the timed steps do: prompts join the batch a few per step
        # (the scheduler's prompt cap beside decodes), so the first ones decode for as many steps
        # as the last ones wait; all are aborted after the timing.
        temperature, top_p = sampling
        for i in range(batch):
            params = SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=4 * batch + steps + 64,
                ignore_eos=True,
                logprobs=logprobs,
                seed=i if seeded else None,
            )
            engine.add_request(f"{batch}-{i}", [100 + (i + j) % 900 for j in range(prompt_len)], params)
        decoding: set[str] = set()
        while len(decoding) < batch:
            decoding.update(e.request_id for e in engine.step() if e.token_id is not None)
        engine.step()
        walls, cpus = [], []
        for _ in range(steps):
            assert engine.stats().num_running == batch, "a timed step below the batch size"
            start, start_cpu = time.perf_counter(), time.thread_time()
            engine.step()
            walls.append((time.perf_counter() - start) * 1e3)
            cpus.append((time.thread_time() - start_cpu) * 1e3)
        engine.abort_all()
        result[str(batch)] = [statistics.median(walls), statistics.median(cpus)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="model folder (default: the demo model); a --tiny one from "
                        "bench/random_model.py leaves the host's share of a step")  # fmt: skip
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens a request")
    parser.add_argument("--sampling", type=float, nargs=2, metavar=("TEMPERATURE", "TOP_P"),
                        default=[0.0, 1.0], help="sampled requests (default: greedy)")  # fmt: skip
    parser.add_argument("--logprobs", type=int, help="top logprobs every request asks for")
    parser.add_argument("--seeded", action="store_true", help="every request with a seed of its own")
    parser.add_argument("--child", nargs=2, metavar=("TREE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sampling = (args.sampling[0], args.sampling[1])
    if args.child:
        tree, dtype = Path(args.child[0]), args.child[1]
        steps = time_steps(
            tree,
            dtype,
            args.batch,
            args.steps,
            args.model,
            args.prompt_len,
            sampling,
            args.logprobs,
            args.seeded,
        )
        print(json.dumps(steps))
        return

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.baseline_rev], cwd=ROOT, check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        current = Path(tmp) / "current"  # a snapshot: edits during the run do not leak into it
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split("\0")  # fmt: skip
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (current / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, current / name)
        trees = {f"baseline ({args.baseline_rev})": base, "current": current}
        medians: dict[tuple[str, str, str], list[list[float]]] = {}
        for round_ in range(args.rounds):
            order = list(trees.items()) if round_ % 2 == 0 else list(reversed(trees.items()))
            for dtype in args.dtypes:
                for name, tree in order:
                    cmd = [sys.executable, str(current / "bench" / "step_ab.py"), "--baseline-rev", args.baseline_rev,
                           "--child", str(tree), dtype, "--steps", str(args.steps), "--batch", *map(str, args.batch),
                           "--prompt-len", str(args.prompt_len), "--sampling", *map(str, sampling),
                           *(["--logprobs", str(args.logprobs)] if args.logprobs is not None else []),
                           *(["--seeded"] if args.seeded else []),
                           *(["--model", args.model] if args.model else [])]  # fmt: skip
                    load = Path("/proc/loadavg").read_text().split()[0]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tree).stdout
                    for batch, (wall, cpu) in json.loads(out.strip().splitlines()[-1]).items():
                        medians.setdefault((dtype, batch, name), []).append([wall, cpu])
                        print(f"round {round_} {dtype} batch {batch} {name}: wall {wall:.1f} ms, CPU {cpu:.1f} ms "
                              f"per step (load {load})", flush=True)  # fmt: skip
        print("\nmedian over rounds, ms per decode step (one torch thread), wall | CPU:")
        for dtype in args.dtypes:
            for batch in map(str, args.batch):
                (ow, oc), (nw, nc) = (
                    [statistics.median(m[k] for m in medians[(dtype, batch, n)]) for k in (0, 1)]
                    for n in trees
                )
                print(f"  {dtype:8s} batch {batch:>3s}: baseline {ow:7.1f} | {oc:7.1f}  current {nw:7.1f} | {nc:7.1f}"
                      f"  baseline/current {ow / nw:.2f}x | {oc / nc:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
