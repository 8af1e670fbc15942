"""Redis connections of the registry, and the one place Redis failures become BackendUnavailable."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scalellm.registry.errors import BackendUnavailable

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, asyncio.TimeoutError)


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def with_password(url: str, password: str, username: str | None = None) -> str:
    """The URL with ``password`` (and an ACL ``username``) in it; ValueError if it has one already."""
    parts = urlsplit(url)
    if parts.password is not None:
        raise ValueError(f"{redact_url(url)} already holds a password: give it once")
    user = quote(username or parts.username or "", safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.netloc.rsplit('@', 1)[-1]}"
    return urlunsplit(parts._replace(netloc=netloc))


def make_redis(url: str, *, retries: int, connect_timeout_s: float, op_timeout_s: float) -> aioredis.Redis:
    """A redis.asyncio client with short timeouts; `retries` quick reconnects for stale connections."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=op_timeout_s,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries),
        decode_responses=False,
    )


class RedisBackend:
    """The two clients the registry uses: commands (one quick retry) and pub/sub (no retry).

    Pub/sub must not reconnect silently: a watcher that missed messages has to know, so its
    connection fails loudly and the watch restarts from a fresh snapshot.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 1.0, op_timeout_s: float = 2.0) -> None:
        self.url = url
        self.op_timeout_s = op_timeout_s
        self.safe_url = redact_url(url)
        self.redis = make_redis(
            url, retries=1, connect_timeout_s=connect_timeout_s, op_timeout_s=op_timeout_s
        )
        self.pubsub_redis = make_redis(
            url, retries=0, connect_timeout_s=connect_timeout_s, op_timeout_s=op_timeout_s
        )

    def unavailable(self, exc: BaseException) -> BackendUnavailable:
        """The error to raise when Redis failed with exc."""
        detail = str(exc) or type(exc).__name__
        return BackendUnavailable(f"registry backend (redis at {self.safe_url}) unavailable: {detail}")

    @contextlib.asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Turn Redis connection failures inside the block into BackendUnavailable."""
        try:
            yield
        except _UNAVAILABLE as exc:
            raise self.unavailable(exc) from exc

    async def aclose(self) -> None:
        """Close both clients' connection pools."""
        await self.redis.aclose()
        await self.pubsub_redis.aclose()
