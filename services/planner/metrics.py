"""Prometheus metrics of the planner: the desired counts and the signals behind them."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from scalellm.planner import TierPlan
from scalellm.security.metrics import auth_failure_counter

_TIER = ["model", "tier"]


class PlannerMetrics:
    """One gauge per quantity, labelled by model and tier (own registry: tests run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.desired = Gauge(
            "scalellm_planner_desired_replicas", "Workers the planner wants in the tier", _TIER, registry=r
        )
        self.live = Gauge(
            "scalellm_planner_live_replicas", "Workers registered in the tier", _TIER, registry=r
        )
        self.needed = Gauge(
            "scalellm_planner_needed_replicas", "Workers the current load needs (before hysteresis)", _TIER,
            registry=r,
        )  # fmt: skip
        self.ratio = Gauge(
            "scalellm_planner_signal_ratio", "A signal's per-worker mean over its target (1: on target)",
            [*_TIER, "signal"], registry=r,
        )  # fmt: skip
        self.running = Gauge("scalellm_planner_running", "Sequences running in the tier", _TIER, registry=r)
        self.waiting = Gauge("scalellm_planner_waiting", "Sequences waiting in the tier", _TIER, registry=r)
        self.backlog = Gauge(
            "scalellm_planner_prefill_backlog_tokens", "Prompt tokens queued in the tier", _TIER, registry=r
        )
        self.kv_usage = Gauge("scalellm_planner_kv_usage", "Mean used KV fraction", _TIER, registry=r)
        self.ttft = Gauge(
            "scalellm_planner_ttft_seconds", "Mean TTFT the workers measured", _TIER, registry=r
        )
        self.itl = Gauge("scalellm_planner_itl_seconds", "Mean ITL the workers measured", _TIER, registry=r)
        self.changes = Counter(
            "scalellm_planner_scale_events", "Changes of a desired count", [*_TIER, "direction"], registry=r
        )
        self.connected = Gauge(
            "scalellm_planner_registry_connected", "1 while the registry watch is open", registry=r
        )
        self.auth_failures = auth_failure_counter(r)

    def count_auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason).inc()

    def update(self, plans: Sequence[TierPlan], connected: bool) -> None:
        self.connected.set(1 if connected else 0)
        for plan in plans:
            labels = (plan.model, plan.tier.value)
            self.desired.labels(*labels).set(plan.desired)
            self.live.labels(*labels).set(plan.live)
            self.needed.labels(*labels).set(plan.need.replicas)
            for signal, ratio in plan.need.ratios:
                self.ratio.labels(*labels, signal.value).set(ratio)
            load = plan.load
            self.running.labels(*labels).set(load.running)
            self.waiting.labels(*labels).set(load.waiting)
            self.backlog.labels(*labels).set(load.backlog_tokens)
            self.kv_usage.labels(*labels).set(load.kv_usage)
            self.ttft.labels(*labels).set(load.ttft_s)
            self.itl.labels(*labels).set(load.itl_s)
            if plan.change is not None:
                self.changes.labels(*labels, plan.change.value).inc()
