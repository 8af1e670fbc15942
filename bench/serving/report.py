"""Tables and the plot from run_all's rows: `python -m bench.serving.report RESULTS.json [PNG]`."""

from __future__ import annotations

import json
import sys
from typing import Any


def markdown(rows: list[dict[str, Any]], headline_c: int = 64, base: str = "hf-baseline") -> str:
    lines = [
        "| system | conc. | requests | failed | req/s | output tok/s | TTFT mean / p50 / p99 (ms) "
        "| TPOT mean / p50 / p99 (ms) | ITL p50 / p99 (ms) | E2E p50 / p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        t, o, i, e = r["ttft"], r["tpot"], r["itl"], r["e2e"]
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['completed']} | {r['failed']} "
            f"| {r['request_throughput']:.2f} | {r['output_throughput']:.1f} "
            f"| {t['mean_ms']:.0f} / {t['median_ms']:.0f} / {t['p99_ms']:.0f} "
            f"| {o['mean_ms']:.1f} / {o['median_ms']:.1f} / {o['p99_ms']:.1f} "
            f"| {i['median_ms']:.1f} / {i['p99_ms']:.1f} | {e['median_ms']:.0f} / {e['p99_ms']:.0f} |"
        )
    by = {(r["system"], r["concurrency"]): r["output_throughput"] for r in rows}
    lines += ["", f"Output throughput against {base}, same concurrency:", ""]
    for (system, c), value in by.items():
        if system != base and by.get((base, c)):
            lines.append(f"- {system} at {c}: {value / by[(base, c)]:.2f}x")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        cs = [r["concurrency"] for r in mine]
        for ax, ys in (
            (left, [r["output_throughput"] for r in mine]),
            (right, [r["ttft"]["median_ms"] for r in mine]),
        ):
            (line,) = ax.plot(cs, ys, marker="o", label=system)
            capped = [(c, y) for c, y, r in zip(cs, ys, mine, strict=True) if r["requests"] < c]
            if capped:  # fewer requests than streams: never that many in flight
                ax.plot(*zip(*capped, strict=True), "o", color="white", markeredgecolor=line.get_color())
    for ax, title in ((left, "output throughput (tokens/s)"), (right, "median TTFT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend()
    fig.suptitle("SmolLM2-135M-Instruct, 64 in / 32 out tokens, 2 shared CPU cores "
                 "(hollow: requests capped below the concurrency)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        rows = json.load(file)["rows"]
    print(markdown(rows))
    if len(sys.argv) > 2:
        plot(rows, sys.argv[2])
