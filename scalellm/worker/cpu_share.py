"""Cores lent between the CPU workers of one machine.

`scalellm up --colocated --decode 2` on two cores gives each worker one torch thread. At 64
streams two single-threaded engines often serve more than one engine on two threads (six of seven
alternated pairs, ~15% at the median, though not in every round: docs/benchmarks.md): an OpenMP
team waits at the end of every kernel for whichever of its threads the OS paused, and two
processes never wait for each other. But one stream then runs on one core while the other idles.

A CPU share is a small file (in /dev/shm where there is one: memory, not disk) with one byte per
worker slot, made by the launcher before the workers start. Each worker sets its byte while it
has requests and, before each step, takes an even share of the cores among the busy workers:

    worker 1 busy, worker 2 busy   ->  1 thread each
    worker 1 busy, worker 2 idle   ->  worker 1 takes 2 threads

A worker that dies with its byte set only makes the others use fewer threads until it is
restarted on the same slot and clears it. The file's name carries the launcher's pid (and its pid
namespace: containers sharing /dev/shm number their processes apart), so a launcher that was
killed before it could remove its file has it removed by the next one in the same namespace.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from pathlib import Path

PREFIX = "scalellm-cpu-share-"


def create(slots: int, folder: Path | None = None) -> Path:
    """A new share file for ``slots`` workers, all idle; the caller removes it (``remove``).

    In ``folder`` (default /dev/shm, else the temporary folder), after removing the files there
    whose launcher is gone."""
    if slots < 1:
        raise ValueError("a CPU share needs at least one slot")
    if folder is None:
        folder = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    remove_orphans(folder)
    fd, name = tempfile.mkstemp(prefix=f"{_namespace_prefix()}{os.getpid()}-", dir=folder)
    try:
        os.write(fd, bytes(slots))
    finally:
        os.close(fd)
    return Path(name)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def remove_orphans(folder: Path) -> None:
    """Remove the share files in ``folder`` whose creator (the pid in the name, in this process's
    pid namespace) no longer runs."""
    prefix = _namespace_prefix()
    for path in folder.glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(OSError):  # another launcher removed it first
                path.unlink()


def _namespace_prefix() -> str:
    """Share files' names in this process's pid namespace (Linux: its inode; 0 where there is
    none to read) start with this, then the creator's pid and a dash."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{PREFIX}{namespace}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def machine_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class CpuShare:
    """One worker's view of a share file: its own slot, and how many slots are busy."""

    def __init__(self, path: Path, slot: int, cores: int | None = None) -> None:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if not 0 <= slot < size:
                raise ValueError(f"CPU share slot {slot} is outside {path} ({size} slots)")
            self._map = mmap.mmap(f.fileno(), size)
        self.slot = slot
        self.cores = cores or machine_cores()

    def threads(self, busy: bool) -> int:
        """Mark this worker busy or idle; the threads it should use for its next step."""
        self._map[self.slot] = 1 if busy else 0
        flags = self._map[:]  # bytes: iterating an mmap itself gives 1-byte strings, all truthy
        others = sum(1 for i, flag in enumerate(flags) if flag and i != self.slot)
        return max(1, self.cores // (others + 1))

    def close(self) -> None:
        """Mark this worker idle and let the file go."""
        if not self._map.closed:
            self._map[self.slot] = 0
            self._map.close()
