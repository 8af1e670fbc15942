"""Errors of the registry, shared by the kvstore (which maps them to gRPC codes) and its clients."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every registry error."""


class InvalidRegistration(RegistryError, ValueError):
    """A malformed WorkerInfo or Load (gRPC INVALID_ARGUMENT)."""


class LeaseUnknown(RegistryError):
    """The lease is not (or no longer) known: expired, or the backend lost its state (NOT_FOUND).

    The worker should register again.
    """


class LeaseSuperseded(RegistryError):
    """Another registration of the same worker_id replaced this lease (FAILED_PRECONDITION)."""


class BackendUnavailable(RegistryError):
    """The Redis backend cannot be reached (the kvstore answers UNAVAILABLE)."""


class RegistryUnavailable(RegistryError):
    """No kvstore address gave an answer (client side: every replica down, or the backend down)."""
