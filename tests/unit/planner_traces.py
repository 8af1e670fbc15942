"""Load traces for the planner's tests: registry views built from a demand curve, and a small
simulated mesh that follows the planner (new workers register after a start-up delay).

A trace is a function of time giving the demand of each tier: sequences in the decode tier
(running + waiting, spread evenly over its live workers) and prompt tokens queued in the prefill
tier. Nothing here sleeps: time is the simulation's.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from scalellm.planner import Planner, Tier, TierPlan
from scalellm.registry import ViewSnapshot, WorkerInfo, WorkerLoad, WorkerRecord, WorkerRole

MODEL = "tiny"
BATCH = 8
CAPACITY = 1000


def record(
    worker_id: str, role: WorkerRole = WorkerRole.DECODE, *, running: int = 0, waiting: int = 0,
    free: int = CAPACITY, backlog: int = 0, ttft: float = 0.0, itl: float = 0.0, batch: int = BATCH,
    model: str = MODEL,
) -> WorkerRecord:  # fmt: skip
    info = WorkerInfo(
        worker_id=worker_id, role=role, model=model, grpc_address="127.0.0.1:1",
        transfer_endpoint="127.0.0.1:2", kv_capacity_blocks=CAPACITY, kv_block_size=16, max_running=batch,
    )  # fmt: skip
    load = WorkerLoad(
        running=running,
        waiting=waiting,
        free_blocks=free,
        prefill_backlog_tokens=backlog,
        ttft_s=ttft,
        itl_s=itl,
    )
    return WorkerRecord(info=info, load=load)


def view(*workers: WorkerRecord, connected: bool = True) -> ViewSnapshot:
    ordered = tuple(sorted(workers, key=lambda w: w.worker_id))
    return ViewSnapshot(workers=ordered, connected=connected, synced=True)


def decode_workers(count: int, sequences: float, batch: int = BATCH) -> list[WorkerRecord]:
    """`count` decode workers sharing `sequences` evenly; beyond the batch limit they wait."""
    out = []
    for i in range(count):
        share = round(sequences * (i + 1) / count) - round(sequences * i / count)
        out.append(
            record(f"decode-{i + 1}", running=min(share, batch), waiting=max(0, share - batch), batch=batch)
        )
    return out


def prefill_workers(count: int, backlog_tokens: float) -> list[WorkerRecord]:
    share = round(backlog_tokens / count) if count else 0
    return [
        record(f"prefill-{i + 1}", WorkerRole.PREFILL, backlog=share, running=min(share, 1))
        for i in range(count)
    ]


Demand = Callable[[float], float]


def ramp(points: list[tuple[float, float]]) -> Demand:
    """Piecewise-linear demand through (time, value) points, flat outside them."""

    def demand(t: float) -> float:
        if t <= points[0][0]:
            return points[0][1]
        for (t0, v0), (t1, v1) in itertools.pairwise(points):
            if t0 <= t <= t1:
                return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return points[-1][1]

    return demand


def noisy(level: float, spread: float, seed: int = 7) -> Demand:
    """A steady level with uniform noise of +-spread (fraction of the level), fixed by the seed."""
    rng = random.Random(seed)
    cache: dict[float, float] = {}

    def demand(t: float) -> float:
        if t not in cache:
            cache[t] = max(0.0, level * (1 + rng.uniform(-spread, spread)))
        return cache[t]

    return demand


@dataclass
class SimulatedMesh:
    """Workers that follow the planner: a new one registers startup_s after it was asked for; a
    removed one leaves at once (it deregisters when it starts draining)."""

    planner: Planner
    decode_demand: Demand
    prefill_demand: Demand = lambda t: 0.0
    startup_s: float = 20.0
    live: dict[Tier, int] = field(default_factory=lambda: {Tier.DECODE: 1, Tier.PREFILL: 1})
    dead: Callable[[float], dict[Tier, int]] = lambda t: {}
    """Workers of a tier that are dead at time t (not yet restarted)."""
    _starting: list[tuple[float, Tier]] = field(default_factory=list)
    history: list[tuple[float, dict[Tier, TierPlan]]] = field(default_factory=list)

    def run(self, until: float) -> list[tuple[float, dict[Tier, TierPlan]]]:
        t, step = 0.0, self.planner.policy.interval_s
        while t <= until:
            self._arrive(t)
            dead = self.dead(t)
            decode = max(0, self.live[Tier.DECODE] - dead.get(Tier.DECODE, 0))
            prefill = max(0, self.live[Tier.PREFILL] - dead.get(Tier.PREFILL, 0))
            snapshot = view(
                *decode_workers(decode, self.decode_demand(t)),
                *prefill_workers(prefill, self.prefill_demand(t)),
            )
            plans = {p.tier: p for p in self.planner.observe(snapshot, t)}
            self.history.append((t, plans))
            for tier, plan in plans.items():
                self._follow(t, tier, plan.desired)
            t += step
        return self.history

    def _arrive(self, t: float) -> None:
        for item in [s for s in self._starting if s[0] <= t]:
            self._starting.remove(item)
            self.live[item[1]] += 1

    def _follow(self, t: float, tier: Tier, desired: int) -> None:
        pending = sum(1 for _, x in self._starting if x is tier)
        have = self.live[tier] + pending
        for _ in range(desired - have):
            self._starting.append((t + self.startup_s, tier))
        if desired < have:
            self.live[tier] -= have - desired  # a real launcher drains the newest; here they just go

    def desired(self, tier: Tier) -> list[int]:
        return [plans[tier].desired for _, plans in self.history]

    def times_of_changes(self, tier: Tier) -> list[tuple[float, int]]:
        out, last = [], None
        for t, plans in self.history:
            if plans[tier].desired != last:
                out.append((t, plans[tier].desired))
                last = plans[tier].desired
        return out
