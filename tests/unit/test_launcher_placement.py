"""`scalellm up --pin-cpus`: each worker on cores of its own, the services on the rest, and a
child started with a core set really runs there."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalellm.cli import build_parser
from scalellm.launcher import placement
from scalellm.launcher.child import Child
from scalellm.launcher.config import UpConfig
from scalellm.launcher.plan import ChildSpec, WorkerRun, worker_specs


def _up(*argv: str) -> UpConfig:
    args = build_parser().parse_args(["up", "--model", "/m", *argv])
    assert isinstance(args, argparse.Namespace)
    return UpConfig.from_namespace(args)


def _ports() -> Iterator[int]:
    yield from range(45000, 46000)


def test_colocated_worker_on_core_0_and_services_on_the_rest() -> None:
    config = _up("--colocated", "--decode", "1", "--threads-per-worker", "1", "--pin-cpus")
    assert placement.worker_cores(config, 0, (0, 1)) == (0,)
    assert placement.service_cores(config, (0, 1)) == (1,)


def test_workers_take_cores_in_slot_order_and_those_without_room_stay_unpinned() -> None:
    config = _up("--prefill", "1", "--decode", "2", "--threads-per-worker", "2", "--pin-cpus")
    cores = tuple(range(5))
    assert [placement.worker_cores(config, s, cores) for s in range(3)] == [(0, 1), (2, 3), ()]
    assert placement.service_cores(config, cores) == ()  # the workers need 6: services share all


def test_nothing_is_pinned_without_the_flag() -> None:
    config = _up("--colocated", "--decode", "1", "--threads-per-worker", "1")
    assert placement.worker_cores(config, 0, (0, 1)) == ()
    assert placement.service_cores(config, (0, 1)) == ()


@pytest.mark.skipif(len(placement.available_cores()) < 2, reason="needs 2 cores to pin one")
def test_worker_specs_carry_their_cores() -> None:
    config = _up("--colocated", "--decode", "1", "--threads-per-worker", "1", "--pin-cpus", "--device", "cpu")
    (spec,) = worker_specs(
        WorkerRun(config, "127.0.0.1:1", "run", port=_ports().__next__), Path(config.model or "")
    )
    assert spec.cpus == placement.available_cores()[:1]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_a_child_runs_on_its_cores() -> None:
    core = placement.available_cores()[-1]
    probe = "import os; print('cores', sorted(os.sched_getaffinity(0)), flush=True)"
    child = Child(ChildSpec("probe", (sys.executable, "-c", probe), cpus=(core,)))
    child.start()
    assert child._proc is not None and child._pump is not None
    assert child._proc.wait(timeout=60) == 0
    child._pump.join(timeout=10)
    assert f"cores [{core}]" in list(child.output)
    assert os.sched_getaffinity(0) == set(placement.available_cores())  # the launcher's own is untouched
