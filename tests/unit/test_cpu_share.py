"""CPU workers on one machine lend each other cores (worker/cpu_share.py): the share file's
arithmetic, who gets one from `scalellm up`, and a real worker's step thread taking its share."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from scalellm.cli import build_parser
from scalellm.launcher.config import UpConfig
from scalellm.launcher.plan import WorkerRun, worker_specs
from scalellm.registry import WorkerRole
from scalellm.worker import cpu_share
from scalellm.worker.config import WorkerConfig, parse_worker_args
from scalellm.worker.cpu_share import CpuShare


@pytest.fixture
def share_file() -> Iterator[Path]:
    path = cpu_share.create(3)
    yield path
    cpu_share.remove(path)


def test_busy_workers_split_the_cores_and_an_idle_one_lends_its_own(share_file: Path) -> None:
    a, b, c = (CpuShare(share_file, slot, cores=4) for slot in range(3))
    assert a.threads(True) == 4  # alone: every core
    assert b.threads(True) == 2  # a is busy too
    assert a.threads(True) == 2
    assert c.threads(True) == 1  # 4 cores over 3 busy workers
    b.threads(False)  # b idles: the two busy ones (a, c) split the cores
    assert a.threads(True) == 2
    assert c.threads(True) == 2
    c.close()  # a worker that stops is idle
    assert a.threads(True) == 4
    assert share_file.read_bytes() == bytes([1, 0, 0])
    a.close()
    b.close()
    assert share_file.read_bytes() == bytes(3)


def test_every_worker_keeps_at_least_one_thread(share_file: Path) -> None:
    shares = [CpuShare(share_file, slot, cores=1) for slot in range(3)]
    assert [s.threads(True) for s in shares] == [1, 1, 1]


def test_a_slot_outside_the_file_or_an_empty_share_is_refused(share_file: Path) -> None:
    with pytest.raises(ValueError, match="slot 3"):
        CpuShare(share_file, 3)
    with pytest.raises(ValueError, match="at least one slot"):
        cpu_share.create(0)


def test_a_killed_launchers_file_is_removed_by_the_next_one(tmp_path: Path) -> None:
    """A launcher killed with SIGKILL cannot remove its share file; the next one to create a
    share there removes every file whose launcher (the pid in its name) no longer runs, among
    the files of its own pid namespace (another namespace's pids mean other processes)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ns = os.stat("/proc/self/ns/pid").st_ino if os.path.exists("/proc/self/ns/pid") else 0
    orphan = tmp_path / f"{cpu_share.PREFIX}{ns}.{gone.pid}-abc"
    alive = tmp_path / f"{cpu_share.PREFIX}{ns}.{os.getppid()}-def"  # the process that ran pytest
    elsewhere = tmp_path / f"{cpu_share.PREFIX}{ns + 1}.{gone.pid}-ghi"
    other = tmp_path / "not-a-share"
    for path in (orphan, alive, elsewhere, other):
        path.write_bytes(bytes(2))
    made = cpu_share.create(2, tmp_path)
    assert made.name.startswith(f"{cpu_share.PREFIX}{ns}.{os.getpid()}-") and made.read_bytes() == bytes(2)
    assert not orphan.exists() and alive.exists() and elsewhere.exists() and other.exists()


def _up(*argv: str) -> UpConfig:
    args = build_parser().parse_args(["up", "--model", "/m", *argv])
    assert isinstance(args, argparse.Namespace)
    return UpConfig.from_namespace(args)


@pytest.mark.parametrize(
    ("argv", "shares"),
    [
        (["--colocated", "--decode", "2", "--device", "cpu"], True),
        (["--prefill", "1", "--decode", "1"], True),  # device auto: workers on CPU decide
        (["--colocated", "--decode", "1"], False),  # one worker: nobody to lend to
        (["--colocated", "--decode", "2", "--pin-cpus"], False),  # cores placed by hand
        (["--colocated", "--decode", "2", "--threads-per-worker", "1"], False),
        (["--colocated", "--decode", "2", "--tensor-parallel-size", "2"], False),  # ranks move together
        (["--colocated", "--decode", "2", "--device", "cuda"], False),
    ],
)
def test_up_shares_cores_only_between_single_rank_cpu_workers_it_places(
    argv: list[str], shares: bool
) -> None:
    assert _up(*argv).shares_cpus is shares


def test_each_worker_gets_the_file_and_a_slot_of_its_own() -> None:
    config = _up("--prefill", "1", "--decode", "2")
    ports = iter(range(46000, 47000))
    specs = worker_specs(WorkerRun(config, "127.0.0.1:1", "r1", Path("/s"), lambda: next(ports)), Path("/m"))
    parsed = []
    for spec in specs:
        args = spec.argv[spec.argv.index("--role") :]
        roles = (WorkerRole.PREFILL,) if "prefill" in spec.name else (WorkerRole.DECODE, WorkerRole.BOTH)
        parsed.append(parse_worker_args(args, roles, environ={}))
    assert {c.cpu_share_file for c in parsed} == {"/s"}
    assert sorted(c.cpu_share_slot for c in parsed) == [0, 1, 2]
    no_share = worker_specs(WorkerRun(config, "127.0.0.1:1", "r1", port=lambda: next(ports)), Path("/m"))
    assert not any("--cpu-share-file" in s.argv for s in no_share)


async def _until_idle(path: Path, slot: int) -> None:
    """The step thread marks its worker idle on the loop after the last step: wait for it."""
    for _ in range(200):
        if path.read_bytes()[slot] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"slot {slot} stayed busy")


async def test_a_worker_takes_its_share_on_its_step_thread(
    tiny_llama: Path, share_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose neighbour is busy steps on cores // 2 threads, on every core once the
    neighbour idles, and marks itself idle when its requests are done."""
    from scalellm.engine.config import EngineConfig
    from scalellm.types import SamplingParams
    from scalellm.worker.engine_host import EngineHost
    from scalellm.worker.metrics import WorkerMetrics

    before = torch.get_num_threads()
    config = WorkerConfig(
        role=WorkerRole.BOTH,
        engine=EngineConfig(
            model=str(tiny_llama), device="cpu", num_kv_blocks=32, block_size=4, num_threads=1
        ),
        cpu_share_file=str(share_file),
        cpu_share_slot=0,
    )
    neighbour = CpuShare(share_file, 1)
    host = EngineHost(config, WorkerMetrics())
    seen: list[int] = []  # torch's threads as each step starts (a per-thread setting: read there)
    step = host.engine.step
    monkeypatch.setattr(host.engine, "step", lambda: seen.append(torch.get_num_threads()) or step())
    host.start()
    try:
        for neighbour_busy in (True, False):
            neighbour.threads(neighbour_busy)
            req = host.engine.make_request(
                f"r{neighbour_busy}", [5, 17, 99, 3], SamplingParams(max_tokens=3, ignore_eos=True)
            )
            assert len([e async for e in host.aengine.add_and_stream(req)]) == 3
            await _until_idle(share_file, 0)
    finally:
        host.stop()
        neighbour.close()
        torch.set_num_threads(before)
    cores = cpu_share.machine_cores()
    assert seen == [max(1, cores // 2)] * 3 + [cores] * 3
