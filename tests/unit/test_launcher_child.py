"""Child: how `scalellm up` starts a service process (through exec_child.py, never preexec_fn)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scalellm.launcher.child import Child
from scalellm.launcher.plan import ChildSpec

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _run(spec: ChildSpec) -> Child:
    child = Child(spec)
    child.start()
    assert child.wait(60) is not None
    return child


@pytest.fixture
def busy_grpc() -> Iterator[None]:
    """This process as the launcher is while children start: a gRPC server and a thread probing
    it over fresh channels (the readiness checks), so gRPC's pollers are running."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        server.stop(None)


def test_children_start_while_grpc_is_busy(busy_grpc: None) -> None:
    """With preexec_fn (fork) about 1 start in 30 died here of SIGABRT inside gRPC before its
    program ran (the forked copy of this process restarting gRPC's pollers); spawning through
    exec_child.py forks nothing of it."""
    codes = [_run(ChildSpec(f"true-{i}", ("true",))).returncode for i in range(200)]
    assert codes == [0] * 200


def test_a_program_that_cannot_run_is_reported() -> None:
    child = _run(ChildSpec("missing", ("/nonexistent/scalellm-service",)))
    assert child.returncode == 127
    assert any("cannot run /nonexistent/scalellm-service" in line for line in child.output)


def test_the_child_keeps_its_pid_and_its_own_session() -> None:
    probe = "import os; print('ids', os.getpid(), os.getsid(0), flush=True)"
    child = _run(ChildSpec("ids", (sys.executable, "-c", probe)))
    assert child.returncode == 0
    assert f"ids {child.pid} {child.pid}" in list(child.output)  # exec kept the pid; setsid made it a leader


@linux_only
def test_a_child_dies_with_its_launcher() -> None:
    """A SIGKILLed launcher cannot stop its children: the death signal armed before exec does."""
    launcher = (
        "import sys, time\n"
        "from scalellm.launcher.child import Child\n"
        "from scalellm.launcher.plan import ChildSpec\n"
        "child = Child(ChildSpec('sleeper', (sys.executable, '-c', 'import time; time.sleep(120)')))\n"
        "child.start()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pid = int(proc.stdout.readline())
    try:
        time.sleep(1.0)  # the sleeper is past exec_child.py and running its own program
        os.kill(pid, 0)  # alive while its launcher is
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid)
    finally:
        proc.kill()
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie no longer runs: its parent, the killed launcher, never reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
