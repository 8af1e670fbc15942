"""GatewayError: one exception for every failure the gateway reports, mapped to HTTP and gRPC.

Each kind fixes the HTTP status, the OpenAI error ``type`` and the gRPC status code, so the HTTP
handlers and the gRPC servicer report the same failure the same way.
"""

from __future__ import annotations

import enum
from typing import Any

import grpc


class ErrorKind(enum.Enum):
    """(HTTP status, OpenAI error type, gRPC status code) of a kind of failure."""

    INVALID = (400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT)
    UNAUTHENTICATED = (401, "authentication_error", grpc.StatusCode.UNAUTHENTICATED)
    NOT_FOUND = (404, "not_found_error", grpc.StatusCode.NOT_FOUND)
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", grpc.StatusCode.UNIMPLEMENTED)
    TOO_LARGE = (413, "invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED)
    OVERLOADED = (429, "rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED)
    INTERNAL = (500, "server_error", grpc.StatusCode.INTERNAL)
    UNAVAILABLE = (503, "service_unavailable", grpc.StatusCode.UNAVAILABLE)
    TIMEOUT = (504, "timeout_error", grpc.StatusCode.DEADLINE_EXCEEDED)

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def openai_type(self) -> str:
        return self.value[1]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[2]


class GatewayError(Exception):
    """A failure to report to the client: a kind, a message, and the offending parameter if any."""

    def __init__(
        self, kind: ErrorKind, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind.openai_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"GatewayError({self.kind.name}, {self.message!r}, param={self.param!r})"


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 400 / INVALID_ARGUMENT naming the offending parameter."""
    return GatewayError(ErrorKind.INVALID, message, param=param, code=code)
