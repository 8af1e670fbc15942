"""Stopping the mesh in order: the planner (`--autoscale`), gateway, workers, kvstore, Redis.

Each tier gets SIGTERM together (its processes drain in parallel) and `drain_timeout_s + 10` s
to exit before SIGKILL; once `forced()` (a second Ctrl-C) it kills at once. Whatever a child
left in its process group is swept after it exits.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Sequence

from scalellm.launcher.child import Child

ORDER = ("planner", "gateway", "worker", "kvstore", "redis")


def stop_in_order(
    children: Sequence[Child], drain_timeout_s: float, forced: Callable[[], bool], say: Callable[[str], None]
) -> None:
    tiers: dict[str, list[Child]] = {tier: [] for tier in ORDER}
    for child in children:
        tiers.get(child.name, tiers["worker"]).append(child)
    for tier in ORDER:
        stop_together(tiers[tier], drain_timeout_s + 10.0, forced, say)


def stop_together(
    children: Sequence[Child], timeout_s: float, forced: Callable[[], bool], say: Callable[[str], None]
) -> None:
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        while child.wait(0.1) is None:
            if forced() or time.monotonic() > deadline:
                say(f"{child.name} (pid {child.pid}) did not stop: killing it")
                child.kill()
                break
        child.sweep()
