"""PlannerLoop: sample a WorkerView every interval, plan, hand the plans to a callback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from scalellm.planner.planner import Planner, TierPlan
from scalellm.registry import WorkerView

log = logging.getLogger(__name__)

OnPlan = Callable[[tuple[TierPlan, ...]], None]


class PlannerLoop:
    """Runs until cancelled; each change of a desired count is logged once."""

    def __init__(
        self,
        planner: Planner,
        view: WorkerView,
        on_plan: OnPlan,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.planner = planner
        self.view = view
        self.on_plan = on_plan
        self._clock = clock

    def tick(self) -> tuple[TierPlan, ...]:
        """One decision on the view as it is now."""
        plans = self.planner.observe(self.view.snapshot(), self._clock())
        for plan in plans:
            if plan.change is not None:
                driver = plan.need.driver.value if plan.need.driver else "none"
                log.info(
                    "%s %s: scale %s to %d (live %d, need %.2f by %s)", plan.model, plan.tier.value,
                    plan.change.value, plan.desired, plan.live, plan.need.replicas, driver,
                )  # fmt: skip
        self.on_plan(plans)
        return plans

    async def run(self) -> None:
        interval = self.planner.policy.interval_s
        while True:
            self.tick()
            await asyncio.sleep(interval)
