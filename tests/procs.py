"""Start mesh services as real subprocesses for tests, and make sure none outlives its test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[str]
    address: str = ""
    output: deque[str] = field(default_factory=lambda: deque(maxlen=200))

    def log(self) -> str:
        return "\n".join(self.output)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def start_service(
    module: str,
    args: list[str],
    name: str | None = None,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> Service:
    """Run `python -m module args` (with ``env`` added to ours) and wait for its "READY <address>" line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    svc = Service(name or module, proc)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            svc.output.append(line.rstrip())
            if line.startswith("READY ") and not ready.is_set():
                svc.address = line.split()[1]
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            svc.kill()
            raise RuntimeError(f"{svc.name} did not start:\n{svc.log()}")
    return svc
