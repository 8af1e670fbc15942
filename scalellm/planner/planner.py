"""Planner: the registry view in, the desired worker count of every (model, tier) out.

Each interval the planner turns a tier's load into a need (signals.py) and keeps the needs seen
since the tier's last change. The desired count moves only when the whole window agrees:

    up:    min(need over up_window)   > desired x (1 + up_tolerance)
           -> desired = min(ceil(that need), desired + max_step_up, max)
    down:  max(need over down_window) <= (desired - 1) x down_headroom
           -> desired = max(ceil(that need / down_headroom), desired - max_step_down, min)

    e.g. desired 1: up once the need stayed above 1.1 for up_window_s; back from 2 to 1 once it
    stayed at or below 0.8 for down_window_s. A need between the two moves nothing (hysteresis).

After a change the earlier needs are forgotten (they were measured on the old count), the next
scale-up waits up_cooldown_s and the next scale-down down_cooldown_s. While workers asked for
are still starting (fewer live than desired), no further scale-up for startup_grace_s. A worker
that dies changes nothing by itself: its load moves to the others, and only that load counts.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from scalellm.planner.policy import PlannerPolicy, Tier, TierLimits
from scalellm.planner.signals import Need, TierLoad, need_of
from scalellm.registry import ViewSnapshot, WorkerRecord


class Change(enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class TierPlan:
    """One tier's decision at one interval."""

    model: str
    tier: Tier
    desired: int
    live: int
    load: TierLoad
    need: Need
    change: Change | None = None
    """Set on the interval the desired count changed."""


class TierState:
    """The desired count of one tier and the needs seen since it last changed."""

    def __init__(self, policy: PlannerPolicy, limits: TierLimits, desired: int, now: float) -> None:
        self.policy = policy
        self.limits = limits
        self.desired = limits.clamp(desired)
        self.changed_at = now
        self.last_change: Change | None = None
        """None until the first change: the cool-downs count from a change, not from the start."""
        self._needs: deque[tuple[float, float]] = deque()

    def observe(self, now: float, live: int, need: float) -> Change | None:
        """Record one need; returns the change made, if any."""
        p = self.policy
        needs = self._needs
        needs.append((now, need))
        # Keep the newest need from before the longest window: it says the window is covered.
        while len(needs) > 1 and now - needs[1][0] >= max(p.up_window_s, p.down_window_s):
            needs.popleft()
        since = now - self.changed_at if self.last_change is not None else math.inf
        low = self._extreme(now, p.up_window_s, min)
        if low is not None and low > self.desired * (1 + p.up_tolerance) and since >= p.up_cooldown_s:
            starting = self.last_change is Change.UP and live < self.desired and since < p.startup_grace_s
            target = min(math.ceil(low - 1e-9), self.desired + p.max_step_up, self.limits.max)
            if not starting and target > self.desired:
                return self._change(now, target, Change.UP)
        high = self._extreme(now, p.down_window_s, max)
        if high is not None and high <= (self.desired - 1) * p.down_headroom and since >= p.down_cooldown_s:
            target = max(
                math.ceil(high / p.down_headroom - 1e-9), self.desired - p.max_step_down, self.limits.min
            )
            if target < self.desired:
                return self._change(now, target, Change.DOWN)
        return None

    def _extreme(self, now: float, window_s: float, pick: Callable[[Iterable[float]], float]) -> float | None:
        """min or max of the needs since the last one taken at least window_s ago (that one
        included: it held until the next); None until the needs span the window."""
        if not self._needs or now - self._needs[0][0] < window_s:
            return None
        start = max(t for t, _ in self._needs if now - t >= window_s)
        return pick(n for t, n in self._needs if t >= start)

    def _change(self, now: float, desired: int, change: Change) -> Change:
        self.desired, self.changed_at, self.last_change = desired, now, change
        self._needs.clear()
        return change


class Planner:
    """Desired counts for every model in the view (or the one given), tier by tier."""

    def __init__(
        self, policy: PlannerPolicy, limits: Mapping[Tier, TierLimits], *, model: str | None = None
    ) -> None:
        self.policy = policy
        self.limits = {tier: limit for tier, limit in limits.items() if limit.max > 0}
        self.model = model
        self._states: dict[tuple[str, Tier], TierState] = {}
        self.last: tuple[TierPlan, ...] = ()

    def observe(self, view: ViewSnapshot, now: float) -> tuple[TierPlan, ...]:
        """Decide on one view. A view that is not synced with the registry decides nothing and
        returns the last plans: a registry outage must not look like an idle mesh."""
        if not view.synced or not view.connected:
            return self.last
        groups: dict[tuple[str, Tier], list[WorkerRecord]] = {key: [] for key in self._states}
        for worker in view.workers:
            if self.model in (None, worker.info.model):
                groups.setdefault((worker.info.model, Tier.of(worker.info.role)), []).append(worker)
        plans = []
        for (model, tier), workers in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1].value)):
            if tier not in self.limits:
                continue
            state = self._states.get((model, tier))
            if state is None:
                state = self._states[(model, tier)] = TierState(
                    self.policy, self.limits[tier], len(workers), now
                )
            load = TierLoad.of(workers)
            need = need_of(load, self.policy)
            change = state.observe(now, len(workers), need.replicas)
            plans.append(TierPlan(model, tier, state.desired, len(workers), load, need, change))
        self.last = tuple(plans)
        return self.last
