"""Per-request records and the summary metrics, with vLLM benchmark_serving's definitions.

TTFT: request sent -> first chunk with content. ITL: gaps between successive content chunks.
TPOT: (E2E - TTFT) / (output tokens - 1), only for requests with more than one output token.
Goodput: requests per second that met every SLO given (TTFT, TPOT, E2E), over the whole run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds from the moment it was sent."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0
    """Prompt tokens: usage.prompt_tokens when the server reports it, else the client's count."""
    output_tokens: int = 0
    """usage.completion_tokens when reported, else the number of content chunks."""
    usage_reported: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    cached_tokens: int = 0
    """usage.prompt_tokens_details.cached_tokens (prefix-cache hits), when the server reports it."""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens > 1:
            return (self.latency - self.ttft) / (self.output_tokens - 1)
        return None


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        if self.ttft_ms is not None and 1000 * r.ttft > self.ttft_ms:
            return False
        if self.tpot_ms is not None and 1000 * (r.tpot or 0.0) > self.tpot_ms:
            return False
        return not (self.e2e_ms is not None and 1000 * r.latency > self.e2e_ms)

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))


@dataclass(frozen=True)
class Stat:
    """mean, p50, p99 of one metric, in milliseconds."""

    mean_ms: float
    median_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stat:
        if not seconds:
            return cls(0.0, 0.0, 0.0)
        ms = 1000 * np.asarray(seconds, dtype=float)
        return cls(float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


@dataclass(frozen=True)
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float | None
    ttft: Stat
    tpot: Stat
    itl: Stat
    e2e: Stat

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: list[RequestResult], duration_s: float, slo: SLO = SLO()) -> Summary:
    ok = [r for r in results if r.success]
    inputs = sum(r.prompt_len for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    outputs = sum(r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    good = sum(slo.met(r) for r in ok) / duration_s if slo.any and duration_s > 0 else None
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return Summary(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=inputs,
        total_output_tokens=outputs,
        total_cached_tokens=cached,
        request_throughput=len(ok) * per_s,
        output_throughput=outputs * per_s,
        total_token_throughput=(inputs + outputs) * per_s,
        goodput=good,
        ttft=Stat.of([r.ttft for r in ok]),
        tpot=Stat.of(tpots),
        itl=Stat.of([gap for r in ok for gap in r.itl]),
        e2e=Stat.of([r.latency for r in ok]),
    )


def format_summary(s: Summary, title: str = "") -> str:
    lines = [f"{'=' * 20} {title or 'Serving benchmark'} {'=' * 20}"]
    row = "{:<38}{:>14}".format
    lines += [
        row("Successful requests:", s.completed),
        row("Failed requests:", s.failed),
        row("Benchmark duration (s):", f"{s.duration_s:.2f}"),
        row("Total input tokens:", s.total_input_tokens),
        row("Total output tokens:", s.total_output_tokens),
        row("Prefix-cache hit rate (tokens):", f"{s.total_cached_tokens / max(1, s.total_input_tokens):.1%}"),
        row("Request throughput (req/s):", f"{s.request_throughput:.2f}"),
        row("Output token throughput (tok/s):", f"{s.output_throughput:.2f}"),
        row("Total token throughput (tok/s):", f"{s.total_token_throughput:.2f}"),
    ]
    if s.goodput is not None:
        lines.append(row("Request goodput (req/s):", f"{s.goodput:.2f}"))
    for name, stat in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E latency", s.e2e)):
        lines += [
            row(f"Mean {name} (ms):", f"{stat.mean_ms:.2f}"),
            row(f"Median {name} (ms):", f"{stat.median_ms:.2f}"),
            row(f"P99 {name} (ms):", f"{stat.p99_ms:.2f}"),
        ]
    return "\n".join(lines)
