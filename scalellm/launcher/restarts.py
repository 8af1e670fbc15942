"""Restart budget and backoff for `scalellm up`'s children, one streak per child name.

    child dies ──▶ ran stable_s or longer since its last start? ── yes ──▶ streak = 0
                                          │
                   streak < budget? ── no ──▶ give up: the launcher stops the mesh with an error
                          │ yes
                   restart after min(max_s, initial_s * 2**streak), then streak += 1

    budget 5, initial 0.5 s, max 8 s: a child that keeps dying at once is restarted after
    0.5, 1, 2, 4 and 8 s, and its sixth quick death ends `scalellm up` (about 16 s of trying).

A streak counts quick deaths in a row, not deaths per minute: a child that crashes 20 s after
each start would never exceed "3 a minute" and loop forever, but it does exhaust a streak.
Kubernetes' CrashLoopBackOff has the same shape (it resets after 10 minutes of running).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    budget: int = 5
    """Restarts in a row (each after a quick death) before giving up; 0: never restart."""
    initial_s: float = 0.5
    max_s: float = 8.0
    stable_s: float = 60.0
    """A child that ran this long before dying starts a new streak."""

    def __post_init__(self) -> None:
        if self.budget < 0:
            raise ValueError(f"a restart budget must be >= 0, got {self.budget}")
        if not 0 <= self.initial_s <= self.max_s or self.stable_s <= 0:
            raise ValueError("restart backoff needs 0 <= initial_s <= max_s and stable_s > 0")

    def delay_s(self, streak: int) -> float:
        """The wait before restart number ``streak + 1`` of a streak."""
        return min(self.max_s, self.initial_s * 2.0 ** min(streak, 32))


@dataclass(slots=True)
class _Record:
    started_at: float
    streak: int = 0
    due_at: float | None = None
    """When the pending restart may start (None: running, or not yet seen dead)."""


@dataclass
class Restarts:
    """Each child name's streak and pending restart; the launcher asks, then acts."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    _records: dict[str, _Record] = field(default_factory=dict, init=False)

    def started(self, name: str) -> None:
        """A child of this name has (re)started now."""
        record = self._records.get(name)
        if record is None:
            self._records[name] = _Record(self.clock())
        else:
            record.started_at, record.due_at = self.clock(), None

    def pending(self, name: str) -> bool:
        """True when the child's death was seen and its restart is scheduled."""
        record = self._records.get(name)
        return record is not None and record.due_at is not None

    def died(self, name: str) -> float | None:
        """Schedule the restart of a child just seen dead: the delay before it, or None when its
        streak used up the budget (give up)."""
        now = self.clock()
        record = self._records.setdefault(name, _Record(now))
        if now - record.started_at >= self.policy.stable_s:
            record.streak = 0
        if record.streak >= self.policy.budget:
            return None
        delay = self.policy.delay_s(record.streak)
        record.streak += 1
        record.due_at = now + delay
        return delay

    def due(self, name: str) -> bool:
        """True once the scheduled restart's delay has passed."""
        record = self._records.get(name)
        return record is not None and record.due_at is not None and self.clock() >= record.due_at

    def streak(self, name: str) -> int:
        """Restarts in the child's current streak."""
        record = self._records.get(name)
        return record.streak if record else 0
