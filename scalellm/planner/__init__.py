"""The planner: registry load reports in, desired prefill and decode worker counts out (no torch).

    policy.py   PlannerPolicy (targets, windows, cool-downs; flags and SCALELLM_PLANNER_*),
                Tier, TierLimits
    signals.py  TierLoad from a tier's load reports, and the Need it implies
    planner.py  Planner / TierState: hysteresis and cool-downs, one TierPlan per tier
    loop.py     PlannerLoop: a WorkerView sampled every interval, plans handed to a callback

Used by `scalellm up --autoscale` (scalellm/launcher/autoscale.py) and `scalellm serve planner`
(services/planner, which exports the plans to Prometheus). Policy: docs/planner.md.
"""

from __future__ import annotations

from scalellm.planner.loop import PlannerLoop
from scalellm.planner.planner import Change, Planner, TierPlan, TierState
from scalellm.planner.policy import POLICY_OPTIONS, PlannerPolicy, Tier, TierLimits
from scalellm.planner.signals import Need, Signal, TierLoad, need_of

__all__ = [
    "POLICY_OPTIONS",
    "Change",
    "Need",
    "Planner",
    "PlannerLoop",
    "PlannerPolicy",
    "Signal",
    "Tier",
    "TierLimits",
    "TierLoad",
    "TierPlan",
    "TierState",
    "need_of",
]
