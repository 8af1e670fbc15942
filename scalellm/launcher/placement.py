"""CPU cores for the children of `scalellm up --pin-cpus` (Linux; elsewhere nothing is pinned).

Workers take ``threads_per_worker x tensor_parallel_size`` cores each, in the slot order GPUs are
handed out in (prefill workers first, then decode workers, then other models' workers); the
services (gateway, kvstore, Redis, planner) share the cores no worker holds. A worker with no
cores left for it, or services when workers hold them all, stay unpinned. On a 2-core machine
with one thread per worker this is vLLM's CPU layout: the model on core 0, everything else on 1,
so the model's threads are never preempted by the gateway streaming tokens.

    cores 0 1 2 3 ...   worker slot 0 | worker slot 1 | ... | services: the rest
"""

from __future__ import annotations

import os

from scalellm.launcher.config import UpConfig

SERVICES = frozenset({"gateway", "kvstore", "redis", "planner"})


def available_cores() -> tuple[int, ...]:
    """The launcher's own cores, in order (none where the platform cannot pin)."""
    if not hasattr(os, "sched_getaffinity"):
        return ()
    return tuple(sorted(os.sched_getaffinity(0)))


def _worker_width(config: UpConfig, cores: tuple[int, ...]) -> int:
    """Cores one worker holds: its torch threads on each of its tensor-parallel ranks."""
    return config.worker_threads(len(cores) or None) * config.tensor_parallel_size


def worker_cores(config: UpConfig, slot: int, cores: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The cores of worker ``slot`` (0-based); () unpinned."""
    cores = available_cores() if cores is None else cores
    width = _worker_width(config, cores)
    start = slot * width
    if not config.pin_cpus or start + width > len(cores):
        return ()
    return cores[start : start + width]


def service_cores(config: UpConfig, cores: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The cores the services share: those past every worker's; () unpinned."""
    cores = available_cores() if cores is None else cores
    held = config.workers * _worker_width(config, cores)
    if not config.pin_cpus or held >= len(cores):
        return ()
    return cores[held:]
