"""The first program of every `scalellm up` child: tie it to the launcher, pin it, exec the service.

    launcher --(posix_spawn / vfork + exec)--> python -I -S exec_child.py PARENT CPUS -- ARGV...
                                                 prctl(PR_SET_PDEATHSIG, SIGTERM); getppid() == PARENT?
                                                 sched_setaffinity(CPUS); execvp(ARGV)  (same pid)

Why a program and not subprocess's ``preexec_fn``: ``preexec_fn`` makes Python fork() the whole
launcher, whose other threads hold gRPC (the readiness probes) and output pumps, and the forked
copy runs code before exec. gRPC's fork handlers then restart its pollers in that copy, and
closing the inherited descriptors before exec pulls their wakeup fd away: the copy aborts with
SIGABRT (``ev_epoll1_linux.cc ... Check failed: wakeup_fd_->Wakeup().ok()``) and the child is
reported dead at start. Without ``preexec_fn`` Python spawns with vfork, which runs no fork
handlers and no Python in a copy of the launcher; the per-child setup happens here instead, in a
fresh single-threaded interpreter. The death signal and the CPU mask both survive exec.

Standard library only, run with ``-I -S``: it must start in milliseconds and import nothing of
ours.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: exec_child.py PARENT_PID CPUS -- PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    parent, cpus, command = int(argv[0]), argv[1], argv[3:]
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before the death signal was armed
        return 1
    if cpus:  # before exec: every thread the service starts inherits the mask
        os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"cannot run {command[0]}: {exc}", file=sys.stderr, flush=True)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
