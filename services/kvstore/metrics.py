"""Prometheus metrics of one kvstore replica (own registry, so tests can run several in-process)."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from scalellm.security.metrics import auth_failure_counter

log = logging.getLogger(__name__)


class KvstoreMetrics:
    """Counters and gauges of the registry service."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "scalellm_kvstore_rpcs", "Registry RPCs by method and status", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "scalellm_kvstore_rpc_seconds",
            "Registry unary RPC latency",
            ["method"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5),
            registry=r,
        )
        self.watchers = Gauge("scalellm_kvstore_watchers", "Open WatchWorkers streams", registry=r)
        self.watch_events = Counter(
            "scalellm_kvstore_watch_events", "Events sent to watchers", ["type"], registry=r
        )
        self.workers = Gauge("scalellm_kvstore_workers", "Registrations in the lease index", registry=r)
        self.expired = Counter("scalellm_kvstore_leases_expired", "Leases this replica expired", registry=r)
        self.backend_up = Gauge("scalellm_kvstore_backend_up", "1 while Redis answers, else 0", registry=r)
        self.auth_failures = auth_failure_counter(r)

    def count_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def observe_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one finished unary RPC."""
        self.rpcs.labels(method, code.name).inc()
        self.rpc_seconds.labels(method).observe(seconds)


class MetricsHttpServer:
    """The /metrics HTTP endpoint on its own thread."""

    def __init__(self, metrics: KvstoreMetrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
