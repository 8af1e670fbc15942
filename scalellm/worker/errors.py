"""Errors a worker raises on purpose, and the one interceptor that turns every exception into a
gRPC status (so servicers stay thin and never leak a stack trace as UNKNOWN)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from scalellm.transfer import LayoutMismatchError

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class WorkerError(Exception):
    code = grpc.StatusCode.INTERNAL


class ResourceExhausted(WorkerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(WorkerError):
    code = grpc.StatusCode.UNAVAILABLE


class WrongWorker(WorkerError):
    """The request names another worker (a stale registry view, or a restarted worker)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, WorkerError):
        return exc.code, str(exc)
    if isinstance(exc, LayoutMismatchError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def reported_status(exc: BaseException, where: str = "handler") -> tuple[grpc.StatusCode, str]:
    """status_of(exc) for a client; an unexpected error (INTERNAL) is logged with its traceback."""
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("unhandled error in %s", where, exc_info=exc)
    return code, message


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a handler to statuses (ValueError -> INVALID_ARGUMENT, ...)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    await context.abort(*reported_status(exc))


def _wrap_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """behavior is an async generator, or a coroutine that writes with context.write()."""
    if not inspect.isasyncgenfunction(behavior):
        # A coroutine that writes with context.write() (grpc's own Health.Watch is one): wrapping it
        # as a generator broke it (INTERNAL "'async for' requires ... __aiter__").
        return _wrap_unary(behavior)

    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc)

    return wrapper
