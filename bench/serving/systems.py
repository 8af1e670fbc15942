"""Start and stop the systems under test as child processes, each in a session of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class System:
    name: str
    command: list[str]
    port: int
    ready_line: str | None = None
    """Wait for this text in the output; then (always) for GET /v1/models to answer 200."""
    extra_body: dict[str, object] = field(default_factory=dict)
    ignore_eos: bool = True
    max_requests: int = 64
    cwd: Path = ROOT
    """Where it starts (another revision's tree: bench/vs_vllm.py's NAME@REV systems)."""
    env: tuple[str, ...] = ()
    """NAME=VALUE settings added to its environment."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


class Running:
    """A started system: `with Running(system, log) as base_url: ...` stops it on exit.

    While it runs, SIGTERM to the benchmark (in its main thread) raises SystemExit, so the block
    exits and stops the system: a benchmark killed by default kills only itself, and left
    ``scalellm up`` (which restarts its children) or vLLM serving.
    """

    def __init__(self, system: System, log: Path, startup_timeout_s: float = 300.0) -> None:
        self.system, self.log, self.timeout = system, log, startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._previous_sigterm: object = None

    def __enter__(self) -> str:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return self._start()
        except BaseException:  # not ready, exited, or SIGTERM while starting: stop what started
            self.__exit__()
            raise

    def _start(self) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(kv.split("=", 1) for kv in self.system.env)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.system.command, cwd=self.system.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.system.name} exited {self.proc.returncode}: {self._tail()}")
            if self._ready():
                return self.system.base_url
            time.sleep(1.0)
        raise RuntimeError(f"{self.system.name} not ready in {self.timeout:.0f} s: {self._tail()}")

    def _ready(self) -> bool:
        if self.system.ready_line and self.system.ready_line not in self.log.read_text(errors="replace"):
            return False
        try:
            with urllib.request.urlopen(f"{self.system.base_url}/models", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:]

    def __exit__(self, *_: object) -> None:
        try:
            self._stop()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)  # type: ignore[arg-type]
                self._previous_sigterm = None

    def _stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # scalellm up drains and stops its own children
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session we created for it
            self.proc.wait(10)


def baseline(model: str, port: int, threads: int, max_requests: int) -> System:
    command = [sys.executable, "-m", "bench.serving.baseline_server", "--model", model,
               "--port", str(port), "--threads", str(threads)]  # fmt: skip
    return System("hf-baseline", command, port, "READY", max_requests=max_requests)


def mesh(
    name: str, topology: list[str], model: str, port: int, extra: list[str], tree: Path = ROOT
) -> System:
    """``scalellm up`` from ``tree``: this checkout, or another revision's files (its processes
    import that tree's packages first: PYTHONPATH)."""
    command = [sys.executable, "-m", "scalellm", "up", *topology, "--model", model, "--http-port", str(port),
               "--grpc-port", "0", "--quiet", "--drain-timeout", "10", *extra]  # fmt: skip
    env = () if tree == ROOT else (f"PYTHONPATH={tree}",)
    return System(name, command, port, "mesh ready:", cwd=tree, env=env)


def tree_at(revision: str, parent: Path | None = None) -> Path:
    """This repository's files at a git revision, extracted once into a folder of their own
    (``git archive``: no worktree registered, nothing to clean up in the repository)."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short=12", f"{revision}^{{commit}}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    folder = (parent or Path(tempfile.gettempdir())) / f"scalellm-at-{sha}"
    if not folder.is_dir():  # extracted beside it, then renamed: a folder there is complete
        partial = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True)
        partial.rename(folder)
    return folder


def llama_cpp(
    python: str, gguf: str, port: int, threads: int, eos_ids: list[int], max_requests: int
) -> System:
    """llama-cpp-python's OpenAI server; EOS suppressed through logit_bias (it has no ignore_eos)."""
    command = [python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--host", "127.0.0.1",
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
               "--interrupt_requests", "False"]  # fmt: skip
    return System(
        "llama.cpp", command, port, None, {"logit_bias": {str(i): -100 for i in eos_ids}}, False, max_requests
    )
