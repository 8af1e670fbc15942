"""`scalellm up`: the whole mesh (Redis, kvstore, prefill and decode workers, gateway) as local
child processes, each started through its own `python -m services.<name>` entry point.

    config.py       UpConfig, the one frozen config
    plan.py         ChildSpec per process: the exact command lines
    child.py        Child: one process, its output and its READY line
    exec_child.py   what each child starts as: death signal, CPU mask, then exec (no preexec_fn)
    launcher.py     Launcher: start in order, supervise, restart a dead child at its address
    restarts.py     the restart budget and backoff per child
    shutdown.py     stop in order: gateway, workers, kvstore, Redis
    probes.py       gRPC health / HTTP /health checks (also `python -m scalellm.launcher.probes`,
                    the containers' healthcheck)
    redis_child.py  a private redis-server as a child of its own
"""

from __future__ import annotations

from scalellm.launcher.config import UpConfig

__all__ = ["UpConfig", "run_up"]


def run_up(config: UpConfig) -> int:
    """Run the mesh until Ctrl-C / SIGTERM (0), or until it cannot start or a child keeps dying (1)."""
    from scalellm.launcher.launcher import Launcher

    return Launcher(config).run()
