"""The one Prometheus counter every internal server keeps of the calls its token check refused."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

AUTH_FAILURES = "scalellm_mesh_auth_failures"
"""Exported as ``scalellm_mesh_auth_failures_total{reason}`` (``missing`` or ``invalid``)."""


def auth_failure_counter(registry: CollectorRegistry) -> Counter:
    """The refusals counter in ``registry``; ``counter.labels(reason).inc`` is what
    :meth:`MeshSecurity.interceptors` calls with each refusal's reason."""
    return Counter(
        AUTH_FAILURES,
        "Internal gRPC calls refused for a missing or wrong mesh token, by reason",
        ["reason"],
        registry=registry,
    )
