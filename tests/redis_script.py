"""Run a container's Redis start script and readiness check (compose, Kubernetes) on this host
with a real redis-server, to prove it requires the password from its secret file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from scalellm.redis_server import free_port, ping


def check_redis_requires_its_password(
    script: str, probe: str, secret_file: str, missing_message: str, folder: Path
) -> None:
    """``script`` (sh, starts ``redis-server - --save "" --appendonly no`` with the password of
    ``secret_file`` on stdin) and ``probe`` (sh, exit 0 when Redis answers), with the secret file
    moved into ``folder`` and Redis on a free loopback port: an empty secret stops the script with
    ``missing_message``; with one, Redis refuses clients without it, the probe passes, a probe
    with a wrong password fails, and the password is not on redis-server's command line."""
    secret, port = folder / "redis-password", free_port()
    script = script.replace(secret_file, str(secret))
    probe = probe.replace(secret_file, str(secret)).replace("redis-cli ping", f"redis-cli -p {port} ping")
    secret.write_text("")
    empty = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert empty.returncode == 1 and missing_message in empty.stderr, empty.stderr
    secret.write_text("pw-" + "x" * 30)
    script = script.replace("--appendonly no", f"--appendonly no --port {port} --bind 127.0.0.1")
    assert f"--port {port}" in script, "the script does not start redis-server as expected"
    server = subprocess.Popen(["sh", "-c", script], cwd=folder, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ping("127.0.0.1", port, password=secret.read_text()):
            assert server.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        assert not ping("127.0.0.1", port)  # without the password: NOAUTH
        assert subprocess.run(["sh", "-c", probe], timeout=30).returncode == 0
        wrong = probe.replace(f"$(cat {secret})", "wrong")
        assert wrong != probe and subprocess.run(["sh", "-c", wrong], timeout=30).returncode != 0
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()  # exec: the shell became redis-server
        assert b"redis-server" in cmdline and b"pw-" not in cmdline
    finally:  # the whole session: nothing of it may outlive the test
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
