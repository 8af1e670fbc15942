"""Prometheus metrics of a worker: latency, queue, batch, KV blocks and KV transfer.

Each worker owns its CollectorRegistry (so several workers can live in one test process) and
serves it over HTTP on --metrics-port. Gauges are refreshed from the engine after every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from scalellm.security.metrics import auth_failure_counter

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.ttft = Histogram(
            "scalellm_time_to_first_token_seconds",
            "Time to first token",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "scalellm_time_per_output_token_seconds", "Time per output token after the first", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )  # fmt: skip
        self.requests = Counter("scalellm_requests_total", "Requests by outcome", ["outcome"], registry=r)
        self.tokens = Counter("scalellm_generated_tokens_total", "Generated tokens", registry=r)
        self.waiting = Gauge("scalellm_queue_depth", "Requests waiting to be scheduled", registry=r)
        self.running = Gauge("scalellm_running_batch", "Requests in the running batch", registry=r)
        self.free_blocks = Gauge("scalellm_kv_blocks_free", "Free KV cache blocks", registry=r)
        self.total_blocks = Gauge("scalellm_kv_blocks_total", "KV cache blocks", registry=r)
        self.transfer_bytes = Counter(
            "scalellm_kv_transfer_bytes_total", "KV bytes moved", ["direction"], registry=r
        )
        self.transfer_seconds = Counter(
            "scalellm_kv_transfer_seconds_total", "Seconds spent moving KV", ["direction"], registry=r
        )
        self.transfer_failures = Counter(
            "scalellm_kv_transfer_failures_total", "Failed KV transfers", registry=r
        )
        self.auth_failures = auth_failure_counter(r)
        self._server: Any = None

    def count_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def watch_transfer_refusals(self, read: Callable[[], int]) -> None:
        """Report the KV channels' refused joins and messages (no mesh token) at scrape time."""
        self.registry.register(
            _Reading(
                "scalellm_kv_transfer_refused", "KV-transfer joins and messages refused (no token)", read
            )
        )

    def watch_speculation(self, drafted: Callable[[], int], accepted: Callable[[], int]) -> None:
        """Speculative decoding's draft tokens verified and accepted (vLLM reports the same pair:
        accepted / drafted is the acceptance rate), read at scrape time."""
        for name, doc, read in (
            ("scalellm_spec_decode_draft_tokens", "Draft tokens verified", drafted),
            ("scalellm_spec_decode_accepted_tokens", "Draft tokens the model agreed with", accepted),
        ):
            self.registry.register(_Reading(name, doc, read))

    def serve(self, port: int, host: str) -> int:
        """Serve /metrics on port (0 picks one); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Reading(Collector):
    """A counter read from elsewhere when scraped."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())
