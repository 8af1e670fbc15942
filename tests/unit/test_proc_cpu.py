"""bench/serving/proc_cpu.py: CPU seconds per kind of process under a server's process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.serving.proc_cpu import cpu_delta, kind, tree_cpu


def test_kind_names_a_module_or_a_program() -> None:
    assert kind(["/venv/bin/python3", "-m", "services.decode", "--role", "both"]) == "services.decode"
    assert kind(["/opt/vllm/bin/vllm", "serve", "/models/x", "--port", "1"]) == "vllm serve"
    assert kind(["/usr/bin/redis-server", "127.0.0.1:6379"]) == "redis-server 127.0.0.1:6379"


SPIN = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass\ntime.sleep(30)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_grandchild_in_its_own_session_is_counted_and_an_outsider_is_not(tmp_path: Path) -> None:
    # the server starts a child in a session of its own, as the launcher does with its children
    start_child = (
        f"subprocess.Popen([sys.executable, '-m', 'timeit', '-n', '1', {SPIN!r}], start_new_session=True)"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time\n{start_child}\ntime.sleep(30)"]
    )
    (tmp_path / "spin.py").write_text(SPIN)
    outsider = subprocess.Popen([sys.executable, "-m", "cProfile", str(tmp_path / "spin.py")])  # beside it
    try:
        before = tree_cpu(server.pid)
        assert server.pid in before and outsider.pid not in before
        deadline = time.monotonic() + 20
        while True:  # each spins 1 s of CPU (from before the first look: 0.5 or more after it)
            used = cpu_delta(before, tree_cpu(server.pid))
            busy_outsider = cpu_delta({}, tree_cpu(outsider.pid)).get("cProfile", 0.0)
            if (used.get("timeit", 0.0) >= 0.5 and busy_outsider >= 0.5) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert busy_outsider >= 0.5  # the outsider was busy too
        assert used.get("timeit", 0.0) >= 0.5, used
        assert next(iter(used)) == "timeit"  # largest first
        assert "cProfile" not in used, used
        assert tree_cpu(2**22 + 7) == {}  # no such process
    finally:
        for pid in tree_cpu(server.pid):
            subprocess.run(["kill", str(pid)], check=False)
        outsider.kill()
        server.wait(10)
        outsider.wait(10)
