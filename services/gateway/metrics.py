"""Prometheus metrics of one gateway (own registry, so tests can run several gateways in-process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    """Request counts and latencies as the gateway sees them (what a client would measure)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.requests = Counter(
            "scalellm_gateway_requests",
            "Requests answered, by API and outcome",
            ["api", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            "scalellm_gateway_errors",
            "Requests that failed, by API and error kind",
            ["api", "kind"],
            registry=r,
        )
        self.in_flight = Gauge("scalellm_gateway_requests_in_flight", "Requests being served", registry=r)
        self.ttft = Histogram(
            "scalellm_gateway_time_to_first_token_seconds",
            "Arrival at the gateway to the first token received from a decode worker",
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "scalellm_gateway_time_per_output_token_seconds",
            "Per choice: (last token - first token) / (tokens - 1)",
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.e2e = Histogram(
            "scalellm_gateway_request_seconds",
            "Arrival to the end of the answer",
            ["api"],
            buckets=_LATENCY,
            registry=r,
        )
        self.overhead = Histogram(
            "scalellm_gateway_overhead_seconds",
            "Per choice: time spent in the gateway itself (validation, tokenization, routing, detokenization)",
            buckets=_OVERHEAD,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "scalellm_gateway_prompt_tokens", "Prompt tokens sent to workers", registry=r
        )
        self.completion_tokens = Counter(
            "scalellm_gateway_completion_tokens", "Tokens generated for clients", registry=r
        )
        self.retries = Counter(
            "scalellm_gateway_route_retries",
            "Decode workers skipped after a failure, by status",
            ["code"],
            registry=r,
        )
        self.cancelled = Counter(
            "scalellm_gateway_cancelled", "Decode streams cancelled early, by reason", ["reason"], registry=r
        )
        self.workers = Gauge("scalellm_gateway_workers", "Routable workers, by kind", ["kind"], registry=r)
        self.auth_failures = Counter(
            "scalellm_gateway_auth_failures",
            "Requests refused for their API key: missing, malformed or unknown (never the key itself)",
            ["reason"],
            registry=r,
        )

    def watch_workers(self, decode: Callable[[], float], prefill: Callable[[], float]) -> None:
        """Report the routable worker counts at scrape time."""
        self.workers.labels("decode").set_function(decode)
        self.workers.labels("prefill").set_function(prefill)

    def render(self) -> bytes:
        """The exposition text for GET /metrics."""
        return generate_latest(self.registry)
