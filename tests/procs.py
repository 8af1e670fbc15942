"""Start mesh services as real subprocesses for tests, and make sure none outlives its test."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from scalellm.lifecycle import ReadyLine

ROOT = Path(__file__).resolve().parent.parent

_machine: list[IO[bytes]] = []  # this process's hold on the lock, once per whole_machine() entered


@contextlib.contextmanager
def whole_machine() -> Iterator[None]:
    """The machine to this test alone among the test processes of this checkout (xdist's
    workers): for tests that load it whole (a `scalellm up` mesh divides every core between its
    workers; the offline engine's long runs), which run each other past their deadlines on CI's
    two cores. Re-entrant within a process; tests that do not take it still run beside."""
    if not _machine:
        key = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
        lock = open(Path(tempfile.gettempdir()) / f"scalellm-whole-machine-{key}.lock", "wb")  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
        _machine.append(lock)
    else:
        _machine.append(_machine[0])
    try:
        yield
    finally:
        lock = _machine.pop()
        if not _machine:
            lock.close()


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[str]
    address: str = ""
    ready: ReadyLine | None = None
    """Its READY line (address, and fields such as the gateway's grpc=)."""
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

    def metrics(self) -> dict[str, float]:
        """The worker's Prometheus samples by name with labels, e.g. 'scalellm_kv_blocks_free' or
        'scalellm_requests_total{outcome="prefilled"}' (served on the port its log names)."""
        port = re.search(r"metrics on :(\d+)", self.log())
        assert port is not None, f"{self.name} serves no metrics:\n{self.log()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=30) as response:
            text = response.read().decode()
        return {m[0]: float(m[1]) for m in re.findall(r"^(scalellm_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def metric(self, name: str) -> float:
        """One sample of metrics(); 0 when it was never recorded (a counter without that label yet)."""
        return self.metrics().get(name, 0.0)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll condition() until it holds; timeout_s is a hang guard only, never a timing assumption."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within the {timeout_s} s hang guard: {what}")
        time.sleep(0.02)


async def await_until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """wait_until for a test on an event loop (condition() must not block for long)."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within the {timeout_s} s hang guard: {what}")
        await asyncio.sleep(0.02)


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
            if not ready.is_set() and (parsed := ReadyLine.parse(line)) is not None:
                svc.address, svc.ready = parsed.address, parsed
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            svc.kill()
            raise RuntimeError(f"{svc.name} did not start:\n{svc.log()}")
    return svc


def child_pids(pid: int) -> dict[int, str]:
    """The live (not zombie) child processes of ``pid``, each with its command line (from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            children[int(stat.parent.name)] = cmdline
    return children
