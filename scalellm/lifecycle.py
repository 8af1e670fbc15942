"""Process lifecycle shared by every service: which event loop runs it, and the stop signals.

Torch-free: the gateway and the kvstore use it too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_event_loop(main: Coroutine[Any, Any, None], loop: str = "uvloop") -> None:
    """Run ``main`` on uvloop when asked for and installed (it is not on Windows), else asyncio."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            logging.getLogger(__name__).warning("uvloop is not installed; using asyncio")
        else:
            uvloop.run(main)
            return
    asyncio.run(main)


async def wait_for_stop_signal() -> None:
    """Return once SIGTERM or SIGINT arrives (installs handlers on the running loop)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
