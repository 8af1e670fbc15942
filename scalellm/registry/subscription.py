"""A subscription to the registry channel that is confirmed before anything else is read."""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

from redis.asyncio.client import PubSub

from scalellm.registry.backend import RedisBackend
from scalellm.registry.bus import BusMessage, parse_bus_message

log = logging.getLogger(__name__)


class EventSubscription:
    """Async context manager and iterator of BusMessage from one channel.

    Entering returns only once Redis confirmed the subscription, so a snapshot read afterwards
    misses nothing. Any Redis failure while iterating raises BackendUnavailable and ends it.
    """

    def __init__(self, backend: RedisBackend, channel: str) -> None:
        self._backend = backend
        self._channel = channel
        self._pubsub: PubSub | None = None

    async def __aenter__(self) -> EventSubscription:
        pubsub = self._backend.pubsub_redis.pubsub()
        self._pubsub = pubsub
        try:
            async with self._backend.guard():
                await pubsub.subscribe(self._channel)
                await asyncio.wait_for(self._confirmed(pubsub), self._backend.op_timeout_s)
            return self
        except BaseException:
            await self.aclose()
            raise

    @staticmethod
    async def _confirmed(pubsub: PubSub) -> None:
        """Wait for Redis to confirm the subscription (the first reply on this connection)."""
        while True:
            reply = await pubsub.get_message(timeout=None)
            if reply is not None and reply["type"] == "subscribe":
                return

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> BusMessage:
        if self._pubsub is None:
            raise StopAsyncIteration
        while True:
            async with self._backend.guard():
                reply = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if reply is None or reply["type"] != "message":
                continue
            try:
                return parse_bus_message(reply["data"])
            except ValueError:
                log.warning("ignoring a malformed message on %s", self._channel, exc_info=True)

    async def aclose(self) -> None:
        """Drop the subscription and its connection (safe to call twice)."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:  # a dead connection cannot be closed politely; it is gone anyway
                log.debug("closing a pub/sub connection failed", exc_info=True)
