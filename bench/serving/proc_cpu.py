"""CPU seconds of a server's processes, read from /proc (Linux), to tell where a serving level's
cores went: the engine, the gateway, the registry, or the server's own front end.

``tree_cpu`` takes the server's process and everything below it (workers, gateway, Redis;
vLLM's API server and engine core; the launcher puts its children in sessions of their own, so
the tree is followed by parent pid) and ``cpu_delta`` sums user + system time per process kind:

    before = tree_cpu(pid); ...run the client...; used = cpu_delta(before, tree_cpu(pid))
"""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def kind(cmdline: list[str]) -> str:
    """A short name for a process: the module after ``-m`` (``services.decode``), else the
    program's name and first argument (``vllm serve``, ``redis-server``)."""
    if "-m" in cmdline[:-1]:
        return cmdline[cmdline.index("-m") + 1]
    words = [Path(cmdline[0]).name, *cmdline[1:2]] if cmdline else ["?"]
    return " ".join(w for w in words if not w.startswith("-") and "/" not in w) or words[0]


def _processes(proc: Path) -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, kind, CPU seconds so far) of every live process."""
    found: dict[int, tuple[int, str, float]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        args = [a.decode(errors="replace") for a in cmdline if a]
        name = stat.split("(", 1)[1].rsplit(")", 1)[0]  # kernel threads have no cmdline
        found[int(entry.name)] = (
            int(fields[1]),
            kind(args) if args else name,
            (int(fields[11]) + int(fields[12])) / TICKS,
        )
    return found


def tree_cpu(root: int, proc: Path = Path("/proc")) -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) for root and every live process below it."""
    processes = _processes(proc)
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, tuple[str, float]] = {}
    todo = [root] if root in processes else []
    while todo:
        pid = todo.pop()
        found[pid] = processes[pid][1:]
        todo.extend(children.get(pid, ()))
    return found


def cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each kind of process used between two snapshots (a process started in
    between counts from zero; one that exited in between is not seen), largest first."""
    used: dict[str, float] = {}
    for pid, (name, seconds) in after.items():
        used[name] = used.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
    return dict(sorted(((k, round(v, 2)) for k, v in used.items()), key=lambda kv: -kv[1]))
