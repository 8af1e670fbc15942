"""From a tier's load reports to the number of workers it needs.

Each signal is the tier's mean per worker divided by its target (the ratio; 1.0 = on target), and
the tier needs `workers x ratio` workers for it. The largest need wins:

    occupancy  sum(running + waiting) / sum(batch limits)   / target_occupancy   every worker
    kv_usage   mean(1 - free / capacity)                     / target_kv_usage    decode-capable
    backlog    sum(prefill backlog tokens) / workers         / target_backlog     prefill-capable
    ttft       mean TTFT of the workers that measured one    / target_ttft_s      prefill-capable
    itl        mean ITL of the workers that measured one     / target_itl_s       decode-capable

e.g. 2 decode workers of batch 8 holding 14 + 10 sequences, target 0.75:
occupancy = 24 / 16 = 1.5, ratio 2.0, need 4.0 workers.
Load, backlog and KV add up across workers, so their need does not depend on how many are alive;
a worker that just registered and reported nothing yet adds capacity and no load.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from scalellm.planner.policy import PlannerPolicy
from scalellm.registry import WorkerRecord


class Signal(enum.Enum):
    OCCUPANCY = "occupancy"
    KV_USAGE = "kv_usage"
    BACKLOG = "backlog"
    TTFT = "ttft"
    ITL = "itl"


@dataclass(frozen=True, slots=True)
class TierLoad:
    """A tier's load summed or averaged over its live workers (zeros where nobody reported)."""

    workers: int = 0
    running: int = 0
    waiting: int = 0
    batch_slots: int = 0
    """Sum of the batch limits of the workers that report one."""
    kv_usage: float = 0.0
    backlog_tokens: int = 0
    ttft_s: float = 0.0
    itl_s: float = 0.0

    @property
    def occupancy(self) -> float:
        """(running + waiting) per batch slot, over the workers that report a batch limit."""
        return 0.0 if not self.batch_slots else self._queued / self.batch_slots

    @property
    def _queued(self) -> int:
        return self.running + self.waiting

    @classmethod
    def of(cls, workers: Sequence[WorkerRecord]) -> TierLoad:
        slotted = [w for w in workers if w.info.max_running > 0]
        decoders = [w for w in workers if w.info.role.can_decode]
        prefillers = [w for w in workers if w.info.role.can_prefill]
        kv = [
            1.0 - w.load.free_blocks / w.info.kv_capacity_blocks
            for w in decoders
            if w.info.kv_capacity_blocks
        ]
        return cls(
            workers=len(workers),
            running=sum(w.load.running for w in slotted),
            waiting=sum(w.load.waiting for w in slotted),
            batch_slots=sum(w.info.max_running for w in slotted),
            kv_usage=_mean([max(0.0, min(1.0, u)) for u in kv]),
            backlog_tokens=sum(w.load.prefill_backlog_tokens for w in prefillers),
            ttft_s=_mean([w.load.ttft_s for w in prefillers if w.load.ttft_s > 0]),
            itl_s=_mean([w.load.itl_s for w in decoders if w.load.itl_s > 0]),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Need:
    """How many workers the tier needs (a real number) and which signal says so."""

    replicas: float
    driver: Signal | None
    """The signal with the largest need; None when every signal is zero."""
    ratios: tuple[tuple[Signal, float], ...]
    """Every signal's ratio to its target, in Signal order (disabled targets left out)."""

    @property
    def ceil(self) -> int:
        return math.ceil(self.replicas - 1e-9)


def need_of(load: TierLoad, policy: PlannerPolicy) -> Need:
    """The tier's need under the policy's targets (see the module doc)."""
    ratios = [
        (Signal.OCCUPANCY, load.occupancy / policy.target_occupancy),
        (Signal.KV_USAGE, load.kv_usage / policy.target_kv_usage),
        (Signal.BACKLOG, _per_worker(load.backlog_tokens, load.workers) / policy.target_backlog_tokens),
    ]
    if policy.target_ttft_s:
        ratios.append((Signal.TTFT, load.ttft_s / policy.target_ttft_s))
    if policy.target_itl_s:
        ratios.append((Signal.ITL, load.itl_s / policy.target_itl_s))
    signal, ratio = max(ratios, key=lambda item: item[1])
    return Need(replicas=load.workers * ratio, driver=signal if ratio > 0 else None, ratios=tuple(ratios))


def _per_worker(total: float, workers: int) -> float:
    return total / workers if workers else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
