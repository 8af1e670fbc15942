"""Child: one service process of `scalellm up`, its output and its READY line.

Each child runs in its own session, so a Ctrl-C at the terminal reaches only the launcher, which
then stops the children in order. On Linux a child also gets SIGTERM if the launcher dies
(PR_SET_PDEATHSIG), so even a SIGKILLed launcher leaves no orphans serving. Both that and the
child's CPU mask are set by exec_child.py, the program every child starts as (why not
``preexec_fn``: its docstring).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from scalellm.launcher.plan import ChildSpec
from scalellm.lifecycle import ReadyLine

EXEC_CHILD = Path(__file__).with_name("exec_child.py")


def exec_argv(argv: Sequence[str], cpus: Sequence[int] = ()) -> list[str]:
    """The command line that runs argv through exec_child.py: on cpus (all: empty), and sent
    SIGTERM when this process dies."""
    mask = ",".join(map(str, cpus))
    return [sys.executable, "-I", "-S", str(EXEC_CHILD), str(os.getpid()), mask, "--", *argv]


class Child:
    def __init__(self, spec: ChildSpec, echo: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.address = spec.address
        self.ready: ReadyLine | None = None
        """What it printed once serving (LINE children; see scalellm.lifecycle.ReadyLine)."""
        self.output: deque[str] = deque(maxlen=60)
        self._echo = echo
        self._ready = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else 0

    @property
    def returncode(self) -> int | None:
        """None while running (or not started), else the exit status (negative: killed by a signal)."""
        return self._proc.poll() if self._proc else None

    @property
    def printed_ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.spec.env}
        self._proc = subprocess.Popen(
            exec_argv(self.spec.argv, self.spec.cpus), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        self._pump = threading.Thread(target=self._read, name=f"up-{self.name}", daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.rstrip("\n")
            self.output.append(line)
            if not self._ready.is_set() and (ready := ReadyLine.parse(line)) is not None:
                self.ready = ready
                self.address = ready.address
                self._ready.set()
            if self._echo is not None:
                self._echo(f"{self.name:<10} | {line}")

    def signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if it is still running after timeout seconds."""
        if self._proc is None:
            return None
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self._pump is not None:
            self._pump.join(1.0)  # let the last lines through
        return code

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10.0)
        self.sweep()

    def sweep(self) -> None:
        """SIGKILL whatever is left in the child's process group (e.g. a grandchild whose parent
        was killed). The group is the child's own session, so nothing else is in it."""
        if self._proc is not None and self._proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(f"    {line}" for line in list(self.output)[-lines:])
