"""Stop the first decode worker that is busy enough (test_chaos.py), polling from a process of its own.

    python tests/e2e/busy_worker.py '{"metrics": {name: url}, "pids": {name: pid}, "at_least": N,
                                      "min_tokens": M, "timeout": S}'

Prints ``ready``, then polls each worker's metrics every few milliseconds until one has a running
batch of at least N once it has generated M tokens, stops it (SIGSTOP) at once and prints
``{"victim": name, "running": batch}`` (or ``{"error": ...}`` at the timeout). Its own process:
in the test's, the poll shares one GIL with the 32 threads reading the streams, and on two cores
a tiny model's whole run (hundreds of milliseconds a worker) could pass between two of its looks.
Only the standard library, so that it starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r"^(scalellm_\w+) (\S+)$", text, re.M)}


def main() -> None:
    args = json.loads(sys.argv[1])
    print("ready", flush=True)
    deadline = time.monotonic() + float(args["timeout"])
    last: dict[str, tuple[float, float]] = {}  # (running batch, generated tokens) per worker
    while time.monotonic() < deadline:
        for name, url in args["metrics"].items():
            seen = scrape(url)
            batch = seen.get("scalellm_running_batch", 0.0)
            tokens = seen.get("scalellm_generated_tokens_total", 0.0)
            if batch >= args["at_least"] and tokens >= args["min_tokens"]:
                os.kill(int(args["pids"][name]), signal.SIGSTOP)
                print(json.dumps({"victim": name, "running": batch}), flush=True)
                return
            last[name] = (batch, tokens)
        time.sleep(0.002)
    error = f"no worker ran {args['at_least']} streams after {args['min_tokens']} tokens: {last}"
    print(json.dumps({"error": error}), flush=True)


if __name__ == "__main__":
    main()
