"""PlannerPolicy: the targets, windows and cool-downs the planner decides by (docs/planner.md).

One option table serves `scalellm serve planner` and `scalellm up --autoscale --planner-arg=...`:
flag, then SCALELLM_PLANNER_* variable, then the default here. Nothing is read at import time.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from scalellm.registry import WorkerRole
from scalellm.settings import Option, parse_config


class Tier(enum.Enum):
    """A tier the planner sizes: prefill workers, and decode workers (colocated `both` ones too)."""

    PREFILL = "prefill"
    DECODE = "decode"

    @classmethod
    def of(cls, role: WorkerRole) -> Tier:
        """The tier a worker of this role is counted in."""
        return cls.PREFILL if role is WorkerRole.PREFILL else cls.DECODE


@dataclass(frozen=True, slots=True)
class TierLimits:
    """The replica range of one tier; max 0 leaves the tier out of planning."""

    min: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.max:
            raise ValueError(f"replica limits must satisfy 0 <= min <= max, got {self.min}..{self.max}")

    def clamp(self, count: int) -> int:
        return max(self.min, min(self.max, count))


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannerPolicy:
    """When to add and remove workers. Targets are per worker; 0 turns a latency target off."""

    interval_s: float = 5.0
    """How often the registry view is sampled and decided on."""
    target_occupancy: float = 0.75
    """(running + waiting) / batch limit that one worker should carry."""
    target_kv_usage: float = 0.8
    """Used fraction of a decode worker's KV blocks."""
    target_backlog_tokens: int = 4096
    """Prompt tokens queued on one prefill worker."""
    target_ttft_s: float = 0.0
    """Mean time to first token on a prefill(-capable) worker; 0: not a signal."""
    target_itl_s: float = 0.0
    """Mean inter-token latency on a decode worker; 0: not a signal."""
    up_tolerance: float = 0.1
    """Scale up only when the need exceeds the desired count by more than this fraction."""
    down_headroom: float = 0.8
    """Scale down only when one worker fewer would still run below this fraction of the targets."""
    up_window_s: float = 30.0
    """The need must stay above the desired count for this long (a spike does not scale)."""
    down_window_s: float = 120.0
    """The need must stay low for this long before a worker is removed."""
    up_cooldown_s: float = 60.0
    """Least time after any change before the next scale-up."""
    down_cooldown_s: float = 180.0
    """Least time after any change before a scale-down."""
    startup_grace_s: float = 300.0
    """After a scale-up, no further one while fewer workers than desired registered, up to this long."""
    max_step_up: int = 2
    max_step_down: int = 1

    def __post_init__(self) -> None:
        for f in fields(PlannerPolicy):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")
        for name in ("interval_s", "target_occupancy", "target_kv_usage", "target_backlog_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.down_headroom <= 1:
            raise ValueError(f"down_headroom must be in (0, 1], got {self.down_headroom}")
        if self.max_step_up < 1 or self.max_step_down < 1:
            raise ValueError("max_step_up and max_step_down must be >= 1")

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> PlannerPolicy:
        """The policy alone (`scalellm up --planner-arg=...`): flags, then SCALELLM_PLANNER_*."""
        return parse_config(
            cls, POLICY_OPTIONS, argv, environ, prog="scalellm up --planner-arg", description="planner policy"
        )


def planner_option(flag: str, field: str, type_: type, help_: str, repeat: bool = False) -> Option:
    """SCALELLM_PLANNER_ + the flag's name: --up-window-s reads SCALELLM_PLANNER_UP_WINDOW_S."""
    env = "SCALELLM_PLANNER_" + flag.lstrip("-").replace("-", "_").upper()
    return Option(flag, field, type_, help_, env=env, repeat=repeat)


POLICY_OPTIONS: tuple[Option, ...] = (
    planner_option("--interval-s", "interval_s", float, "seconds between two decisions"),
    planner_option("--target-occupancy", "target_occupancy", float, "(running+waiting)/batch limit per worker"),
    planner_option("--target-kv-usage", "target_kv_usage", float, "used KV fraction per decode worker"),
    planner_option("--target-backlog-tokens", "target_backlog_tokens", int, "queued prompt tokens per prefill worker"),
    planner_option("--target-ttft-s", "target_ttft_s", float, "mean TTFT on prefill workers (0: off)"),
    planner_option("--target-itl-s", "target_itl_s", float, "mean inter-token latency on decode workers (0: off)"),
    planner_option("--up-tolerance", "up_tolerance", float, "need above desired by more than this fraction"),
    planner_option("--down-headroom", "down_headroom", float, "load with one worker fewer stays below this"),
    planner_option("--up-window-s", "up_window_s", float, "how long the need must stay high"),
    planner_option("--down-window-s", "down_window_s", float, "how long the need must stay low"),
    planner_option("--up-cooldown-s", "up_cooldown_s", float, "least seconds after a change before scaling up"),
    planner_option("--down-cooldown-s", "down_cooldown_s", float, "least seconds after a change before scaling down"),
    planner_option("--startup-grace-s", "startup_grace_s", float, "wait this long for new workers to register"),
    planner_option("--max-step-up", "max_step_up", int, "most workers added at once"),
    planner_option("--max-step-down", "max_step_down", int, "most workers removed at once"),
)  # fmt: skip
