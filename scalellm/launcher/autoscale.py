"""`scalellm up --autoscale`: the planner service as one more child, and the launcher acting on it.

    planner child (python -m services.planner)       launcher loop (every 0.2 s)
    ------------------------------------------       ---------------------------
    watches the mesh's registry, plans every         reads the planner's /metrics
    --interval-s, exports                            (scalellm_planner_desired_replicas), then
    scalellm_planner_desired_replicas{model,tier} -> reconcile(children):
                                                       fewer workers than desired: start the next number
                                                       more: SIGTERM the highest number (it drains:
                                                       NOT_SERVING, deregisters, finishes in flight)

The launcher is an external autoscaler of the planner's metric like any other (Kubernetes' is the
HPA). The planner runs in its own process: a gRPC client thread in the launcher would make the
fork of every later child unsafe. A worker stopped here is `retiring`: the launcher's crash
handling leaves it alone, and once it exits it is dropped from the children (killed if it
outlives its drain timeout by 10 s).
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from scalellm.launcher.child import Child
from scalellm.launcher.config import UpConfig
from scalellm.planner import PlannerPolicy

DESIRED = "scalellm_planner_desired_replicas"
NEEDED = "scalellm_planner_needed_replicas"

TIERS = ("prefill", "decode")


def tier_of(child: Child) -> str | None:
    """'prefill' or 'decode' for a worker child, None for the others."""
    tier = child.name.rsplit("-", 1)[0]
    return tier if tier in TIERS else None


def number_of(child: Child) -> int:
    return int(child.name.rsplit("-", 1)[1])


class Autoscaler:
    """Desired worker counts from the planner's metrics; `reconcile` moves the children to them."""

    def __init__(self, config: UpConfig, model: str, say: Callable[[str], None]) -> None:
        PlannerPolicy.from_args(list(config.planner_args))  # bad planner flags exit 2 before anything starts
        self.model = model
        self.say = say
        self.drain_timeout_s = config.drain_timeout_s
        self.metrics_url = ""
        """The planner child's /metrics; set once it is ready."""
        self._desired = {"prefill": config.prefill, "decode": config.decode}
        self._retiring: dict[Child, float] = {}  # child -> when to kill it

    def retiring(self, child: Child) -> bool:
        return child in self._retiring

    def poll(self) -> None:
        """Read the planner's desired counts for our model (kept as they were if it cannot answer)."""
        if not self.metrics_url:
            return
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=1.0) as response:
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError):
            return
        gauges: dict[str, dict[str, float]] = {DESIRED: {}, NEEDED: {}}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in gauges and sample.labels.get("model") == self.model:
                    gauges[sample.name][sample.labels["tier"]] = sample.value
        for tier, value in gauges[DESIRED].items():
            if tier in self._desired and int(value) != self._desired[tier]:
                need = gauges[NEEDED].get(tier, 0.0)
                self.say(f"planner: {tier} {self._desired[tier]} -> {int(value)} (need {need:.2f} workers)")
                self._desired[tier] = int(value)

    def reconcile(self, children: list[Child], spawn: Callable[[str, int], Child]) -> None:
        """Start or retire workers so each tier has its desired count. `spawn(tier, number)` starts
        a worker and adds it to children; retired ones are removed from children once stopped."""
        self.poll()
        for tier in TIERS:
            active = sorted(
                (c for c in children if tier_of(c) == tier and c not in self._retiring), key=number_of
            )
            desired = self._desired[tier]
            for _ in range(desired - len(active)):
                used = {number_of(c) for c in children if tier_of(c) == tier}
                spawn(tier, min(set(range(1, len(used) + 2)) - used))  # appends it to children
            for child in reversed(active[desired:]):
                self.say(f"draining {child.name} (pid {child.pid}): the planner wants {desired} {tier}")
                child.signal(signal.SIGTERM)
                self._retiring[child] = time.monotonic() + self.drain_timeout_s + 10.0
        children[:] = [c for c in children if not self._gone(c)]

    def _gone(self, child: Child) -> bool:
        """A retiring child that has exited (or was killed for overstaying): forget it."""
        deadline = self._retiring.get(child)
        if deadline is None:
            return False
        if child.returncode is None:
            if time.monotonic() < deadline:
                return False
            self.say(f"{child.name} (pid {child.pid}) did not drain in time: killing it")
            child.kill()
        child.sweep()
        self.say(f"{child.name} (pid {child.pid}) drained and stopped (status {child.returncode})")
        del self._retiring[child]
        return True
