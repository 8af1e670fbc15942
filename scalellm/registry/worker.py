"""WorkerRegistration: a worker's membership, kept alive by a background heartbeat task."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

from scalellm.kvhash import BlockHashDelta
from scalellm.lifecycle import cancel_and_wait
from scalellm.registry.backoff import Backoff
from scalellm.registry.client import RegistryClient
from scalellm.registry.errors import (
    InvalidRegistration,
    LeaseSuperseded,
    LeaseUnknown,
    RegistryError,
    RegistryUnavailable,
)
from scalellm.registry.records import Lease, WorkerInfo, WorkerLoad
from scalellm.registry.validation import validate_load

log = logging.getLogger(__name__)

LoadSource = Callable[[], WorkerLoad | Awaitable[WorkerLoad]]
BlockSource = Callable[[bool], BlockHashDelta | Awaitable[BlockHashDelta]]
"""The engine's block-hash changes since the last call (True: its whole set, as a reset). It must
answer at once (AsyncEngine.take_block_hash_delta does): the heartbeat waits for it."""


class WorkerRegistration:
    """Register at start, heartbeat with load, re-register when the lease is lost, deregister on drain.

    While the registry is unreachable it retries with exponential backoff (never faster than the
    heartbeat interval allows), keeping its lease; a heartbeat answered NOT_FOUND (the lease
    expired, or Redis restarted empty) makes it register again at once. A malformed WorkerInfo or
    another process registering the same worker_id stops it; `error` then says why.

    With a block source it also publishes the worker's cached prefix-block hashes: the whole set
    with each registration, then the changes, polled every ``blocks_interval_s`` and sent at once
    (a heartbeat comes early when the set changed). A delta whose beat failed is merged into the
    next one, so nothing is lost while the registry is away.
    """

    def __init__(
        self,
        client: RegistryClient,
        info: WorkerInfo,
        load_source: LoadSource | None = None,
        *,
        heartbeat_interval_s: float | None = None,
        backoff: Backoff | None = None,
        block_source: BlockSource | None = None,
        blocks_interval_s: float = 0.2,
    ) -> None:
        self.client = client
        self.info = info
        self._load_source = load_source
        self._block_source = block_source
        self._blocks_interval_s = blocks_interval_s
        self._pending = BlockHashDelta()
        """Block-hash changes not yet accepted by the registry."""
        self._interval_override = heartbeat_interval_s
        self._backoff = backoff or Backoff()
        self._last_load = WorkerLoad()
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self._registered = asyncio.Event()
        self.lease: Lease | None = None
        self.registrations = 0
        self.error: RegistryError | None = None

    async def start(self, *, wait: bool = True, timeout_s: float | None = None) -> None:
        """Start the background task; with wait, return once registered (or raise its error)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"registry-heartbeat-{self.info.worker_id}")
        if wait:
            await self.wait_registered(timeout_s)

    async def wait_registered(self, timeout_s: float | None = None) -> Lease:
        """Wait until a lease is held; raises the fatal error if the task stopped on one."""
        if self._task is None:
            raise RuntimeError("WorkerRegistration.start() was not called")
        waiter = asyncio.ensure_future(self._registered.wait())
        try:
            await asyncio.wait([waiter, self._task], timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self.lease is not None:
            return self.lease
        if self.error is not None:
            raise self.error
        raise TimeoutError(f"worker {self.info.worker_id} not registered within {timeout_s} s")

    async def stop(self) -> None:
        """Stop heartbeating without deregistering (the lease then expires on its own)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def drain(self) -> None:
        """Stop heartbeating and deregister, so routing drops this worker at once."""
        await self.stop()
        lease, self.lease = self.lease, None
        self._registered.clear()
        if lease is None:
            return
        try:
            await self.client.deregister(lease)
        except RegistryError as exc:
            log.warning("could not deregister %s (its lease will expire): %s", lease.worker_id, exc)

    async def __aenter__(self) -> WorkerRegistration:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()

    async def _run(self) -> None:
        delay = 0.0
        try:
            while True:
                if self.lease is None:
                    await self._register()
                    delay = self._interval_s()
                await self._wait(delay)
                delay = await self._beat()
        except (InvalidRegistration, LeaseSuperseded) as exc:
            log.error("worker %s stops heartbeating: %s", self.info.worker_id, exc)
            self.error = exc
            self.lease = None
            self._registered.clear()

    def _interval_s(self) -> float:
        if self._interval_override is not None:
            return self._interval_override
        return self.lease.heartbeat_interval_s if self.lease else 1.0

    async def _wait(self, delay: float) -> None:
        """Sleep until the next beat is due, or less once the block set changed (not while the
        registry is unreachable: the backoff decides then, and the changes wait in the pending delta)."""
        if self._block_source is None or self._failures:
            await asyncio.sleep(delay)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(self._blocks_interval_s, left))
            if not (await self._blocks(full=False)).empty:
                return

    async def _blocks(self, *, full: bool) -> BlockHashDelta:
        """Take the source's changes into the pending delta (full: start over from its whole set)."""
        if self._block_source is None:
            return self._pending
        try:
            value = self._block_source(full)
            delta = await value if inspect.isawaitable(value) else value
        except Exception:  # e.g. the engine stopped: publish what is known
            log.exception("block source of %s failed", self.info.worker_id)
            return BlockHashDelta(reset=True) if full else self._pending
        self._pending = delta if full else self._pending.then(delta)
        return self._pending

    async def _register(self) -> None:
        """Register, retrying with backoff while the registry is unreachable."""
        while True:
            try:
                blocks = (await self._blocks(full=True)).added
                self.lease = await self.client.register(self.info, await self._load(), blocks)
            except RegistryUnavailable as exc:
                delay = self._backoff.next_delay()
                self._failed("registration", delay, exc)
                await asyncio.sleep(delay)
                continue
            self._pending = BlockHashDelta()
            self.registrations += 1
            self._recovered()
            self._registered.set()
            log.info("worker %s registered (lease %.1f s)", self.info.worker_id, self.lease.lease_s)
            return

    async def _beat(self) -> float:
        """Heartbeat once; returns how long to wait before the next beat (0: register now)."""
        assert self.lease is not None
        try:
            blocks = await self._blocks(full=False)
            self.lease = await self.client.heartbeat(self.lease, await self._load(), blocks)
            self._pending = BlockHashDelta()
        except LeaseUnknown:
            log.info("lease of %s is unknown to the registry: registering again", self.info.worker_id)
            self.lease = None
            self._registered.clear()
            return 0.0
        except RegistryUnavailable as exc:
            delay = min(self._backoff.next_delay(), self._interval_s())
            self._failed("heartbeat", delay, exc)
            return delay
        self._recovered()
        return self._interval_s()

    def _failed(self, what: str, delay: float, exc: Exception) -> None:
        level = logging.WARNING if self._failures == 0 else logging.DEBUG  # warn once per outage
        self._failures += 1
        log.log(level, "%s of %s failed, retrying in %.2f s: %s", what, self.info.worker_id, delay, exc)

    def _recovered(self) -> None:
        if self._failures:
            log.info(
                "registry reachable again for %s after %d failure(s)", self.info.worker_id, self._failures
            )
        self._failures = 0
        self._backoff.reset()

    async def _load(self) -> WorkerLoad:
        """The load source's current answer (the last one if it fails)."""
        if self._load_source is None:
            return self._last_load
        try:
            value = self._load_source()
            load = await value if inspect.isawaitable(value) else value
            validate_load(load)  # a bad report must not cost the worker its lease
            self._last_load = load
        except Exception:
            log.exception("load source of %s failed; reporting the last load", self.info.worker_id)
        return self._last_load
