"""bench/serving/systems.Running: a benchmark killed with SIGTERM stops the system it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from scalellm.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_benchmark_stops_the_system_it_runs(tmp_path: Path) -> None:
    # the "system": a static HTTP server whose /v1/models answers 200, in a session of its own
    # (Running starts it so), so a signal to the benchmark reaches it only through Running
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "models").write_text("{}")
    port = free_port()
    bench = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from bench.serving.systems import Running, System
        system = System("static", [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
                        {port}, cwd=Path({str(tmp_path)!r}))
        runner = Running(system, Path({str(tmp_path / "system.log")!r}), startup_timeout_s=60)
        with runner:
            print(runner.proc.pid, flush=True)
            time.sleep(300)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", bench], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    system_pid = 0
    try:
        assert proc.stdout is not None
        system_pid = int(proc.stdout.readline())
        assert _alive(system_pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while _alive(system_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(system_pid)
    finally:
        proc.kill()
        proc.wait()
        if system_pid and _alive(system_pid):  # the leak this test catches: not left behind
            os.kill(system_pid, signal.SIGKILL)
