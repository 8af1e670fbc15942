"""Where one decode step's time goes: wall time against the device's busy time.

    python bench/step_profile.py --model FOLDER [--device cuda] [--batch 1 64 256] [--steps 20]

For each batch size: B requests of 128 prompt tokens, run until all of them decode, then
--steps decode steps under the torch profiler. Prints the wall time per step, the summed kernel
time per step (CUDA; on CPU the ops' own time), the kernels launched per step and the most
expensive kernels. Wall time far above kernel (or op) time means the step is bound by Python and
launches, not by the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def profile_batch(engine, batch: int, steps: int, device: str) -> None:  # type: ignore[no-untyped-def]
    from scalellm.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 40, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}", [100 + (i + j) % 1000 for j in range(128)], params)
    decoding: set[str] = set()  # a request decodes from its first token on
    while len(decoding) < batch:
        decoding.update(e.request_id for e in engine.step() if e.token_id is not None)
    for _ in range(3):
        engine.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    walls = []
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t)
    while engine.has_unfinished():
        engine.step()
    wall = statistics.median(walls) * 1e3
    line = f"batch {batch:4d}: wall {wall:7.2f} ms/step"
    if device.startswith("cuda"):
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.device_time for e in kernels) / 1e3 / steps
        line += f", kernels {busy:7.2f} ms/step ({100 * busy / wall:.0f}% of wall), {len(kernels) / steps:.0f} launches/step"
    else:  # the ops' own time against the wall: the rest is Python and the engine between them
        ops = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3 / steps
        line += f", ops {ops:7.2f} ms/step ({100 * ops / wall:.0f}% of wall; the profiler adds to both)"
    print(line, flush=True)
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=8, max_name_column_width=50), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from scalellm.engine.config import EngineConfig
    from scalellm.engine.engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            max_num_seqs=max(args.batch),
            num_kv_blocks=max(args.batch) * 16,
        )
    )
    for batch in args.batch:
        profile_batch(engine, batch, args.steps, args.device)


if __name__ == "__main__":
    main()
