"""The one server interceptor every internal gRPC service installs when a mesh token is set.

A call without the token (or with another one) is answered UNAUTHENTICATED before its handler
runs and before its request is even parsed, so it changes nothing. The check is a SHA-256 and a
constant-time compare, about a microsecond per call (the gateway's Session stream to a decode
worker pays it once per stream, not per request).

The standard health service stays open: container and Kubernetes probes ask it without
credentials, and all it says is SERVING or NOT_SERVING. Reflection is not open.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import grpc

from scalellm.security.token import METADATA_KEY, MeshToken

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")

OPEN_PREFIXES: Final[tuple[str, ...]] = ("/grpc.health.v1.Health/",)
"""Methods callable without the token."""
LOG_EVERY_S: Final[float] = 10.0

RefusalCounter = Callable[[str], None]
"""Called with the reason (``missing`` or ``invalid``) of every refused call."""


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls that do not carry the mesh token in their ``x-scalellm-mesh-token`` metadata."""

    def __init__(self, token: MeshToken, on_refused: RefusalCounter | None = None) -> None:
        self._token = token
        self._on_refused = on_refused
        self._last_log = float("-inf")
        self._unlogged = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        if details.method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        presented = _metadata_value(details.invocation_metadata, METADATA_KEY)
        if self._token.matches(presented):
            return await continuation(details)
        reason = "missing" if presented is None else "invalid"
        self._refused(details.method, reason)
        handler = await continuation(details)
        return _refusing(handler)

    def _refused(self, method: str, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:  # a flood of bad calls must not flood the log
            log.warning(
                "refused %d call(s) without a valid mesh token (latest: %s, token %s)",
                self._unlogged, method, reason,
            )  # fmt: skip
            self._last_log, self._unlogged = now, 0


def _metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | bytes | None:
    for item in metadata or ():
        if item[0] == key:
            return item[1]
    return None


_MESSAGE = "this service requires the mesh token (x-scalellm-mesh-token metadata)"


async def _deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


def _refusing(handler: grpc.RpcMethodHandler[Req, Resp] | None) -> grpc.RpcMethodHandler[Req, Resp]:
    """A handler of the same shape that aborts at once; the request stays raw bytes, unparsed."""
    if handler is None or handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_deny)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_deny)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_deny)
    return grpc.stream_stream_rpc_method_handler(_deny)
