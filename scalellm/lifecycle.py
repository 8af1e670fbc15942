"""Process lifecycle shared by every service: the event loop, the stop signals, stopping tasks.

Torch-free: the gateway and the kvstore use it too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, ClassVar

CANCEL_RETRY_S = 0.05

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class ReadyLine:
    """What every service prints on stdout once it serves, and how a parent reads it back:
    ``READY <address> [key=value ...]``, e.g. ``READY 0.0.0.0:8000 grpc=0.0.0.0:50051``."""

    address: str
    fields: Mapping[str, str] = field(default_factory=dict)

    PREFIX: ClassVar[str] = "READY "

    def __str__(self) -> str:
        return " ".join(["READY", self.address, *(f"{k}={v}" for k, v in self.fields.items())])

    @classmethod
    def parse(cls, line: str) -> ReadyLine | None:
        """The READY line's parts, or None for any other line (or a READY line without an address)."""
        if not line.startswith(cls.PREFIX):
            return None
        address, *rest = line[len(cls.PREFIX) :].split() or [""]
        if not address:
            return None
        return cls(address, dict(part.partition("=")[::2] for part in rest))

    def port_of(self, key: str | None = None) -> int:
        """The port of the address (or of the address field ``key``, e.g. "grpc")."""
        where = self.address if key is None else self.fields[key]
        return int(where.rsplit(":", 1)[1])


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


def stop_requested() -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets, its handlers on the running loop installed before
    this returns. Services call it before they print their READY line: a parent that stops a
    service the moment it reads READY then gets a drain and exit status 0, not a process killed
    by the signal's default action (-15) in the instant before the handlers were in place."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stopping.set)
    return stopping


class StopSignals:
    """Stop signals as they arrive, counted by a handler that takes no lock.

    Python runs a signal handler in the main thread between two instructions of whatever it was
    doing, which may be the handler of the signal before. A handler that sets a threading.Event
    takes the Event's lock: a second signal landing while the first handler holds it deadlocks the
    main thread for good (seen: `timeout` forwarding SIGINT to `scalellm up` as it got one itself),
    and one landing before the first has set the flag is lost. list.append is one C call.
    """

    def __init__(self) -> None:
        self._received: list[int] = []

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self._received.append(signum)

    @property
    def count(self) -> int:
        return len(self._received)

    def requested(self) -> bool:
        """A stop was asked for."""
        return self.count >= 1

    def forced(self) -> bool:
        """A second stop signal: kill instead of waiting for the drain."""
        return self.count >= 2


async def cancel_and_wait(*tasks: asyncio.Future[Any], retry_s: float = CANCEL_RETRY_S) -> None:
    """Cancel the tasks and return once all of them are done; their exceptions are dropped.

    Cancels again every retry_s until each task ends. One cancel() is not enough on Python 3.11:
    `asyncio.wait_for` drops a cancellation that races the completion of what it waits on
    (CPython gh-86296, fixed in 3.12), and redis-py waits on every socket write that way, so a
    background loop that talks to Redis can swallow the cancel and run on, and a plain
    `task.cancel(); await task` then waits forever.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_s)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved


def run_service(name: str, main: Coroutine[Any, Any, None], loop: str = "asyncio") -> int:
    """A service's process: run ``main`` until it returns (after a stop signal); 0 then, 1 when it
    could not start (a port in use, a bad file), logged under ``services.<name>``."""
    try:
        run_event_loop(main, loop)
    except (ValueError, OSError, RuntimeError) as exc:
        logging.getLogger(f"services.{name}").error("%s failed: %s", name, exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
