"""GatewayMetrics on its own: the per-worker series of workers that left the view are dropped."""

from __future__ import annotations

from scalellm.registry import WorkerRole
from services.gateway.core import GatewayMetrics
from services.gateway.routing import Route, WorkerEndpoint


def _worker(worker_id: str, role: WorkerRole) -> WorkerEndpoint:
    return WorkerEndpoint(worker_id=worker_id, address=f"{worker_id}:1", role=role, block_size=16)


def test_series_of_workers_that_left_are_dropped() -> None:
    """Worker ids change with every start: an autoscaled mesh would otherwise add series to every
    gateway for as long as it runs."""
    metrics = GatewayMetrics()
    decode_a, decode_b = _worker("decode-a", WorkerRole.DECODE), _worker("decode-b", WorkerRole.DECODE)
    prefill = _worker("prefill-a", WorkerRole.PREFILL)
    metrics.observe_route(Route(decode_a), 40)  # prefilled on decode-a itself
    metrics.observe_route(Route(decode_b, (prefill,), prompt_blocks=2, prefill_cached_blocks=1), 40)
    metrics.observe_cached_prompt("decode-b", 16)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("scalellm_gateway_routes_total", worker="decode-a", prefill="local") == 1
    assert value("scalellm_gateway_route_cached_tokens_total", worker="prefill-a", prefill="remote") == 16
    metrics.forget_workers({"decode-a", "decode-b"})  # prefill-a left
    assert value("scalellm_gateway_routes_total", worker="prefill-a", prefill="remote") is None
    assert value("scalellm_gateway_route_prompt_tokens_total", worker="decode-a", prefill="local") == 40
    assert value("scalellm_gateway_cached_prompt_tokens_total", worker="decode-b") == 16
    metrics.forget_workers({"decode-a"})
    assert value("scalellm_gateway_cached_prompt_tokens_total", worker="decode-b") is None
    assert value("scalellm_gateway_routes_total", worker="decode-a", prefill="local") == 1
