"""Exceptions raised by the KV transfer layer."""

from __future__ import annotations


class TransferError(RuntimeError):
    """Base class of every failure in :mod:`scalellm.transfer`."""


class ChannelBrokenError(TransferError):
    """The pair channel failed (timeout, dead peer, bad frame) and was aborted.

    The transfer that saw it and every transfer queued behind it fail with this error; the
    channel is rebuilt under a new epoch on its next use.
    """


class ProtocolError(ChannelBrokenError):
    """The peer sent something that is not a valid frame of this protocol."""


class AuthenticationError(TransferError):
    """The peer could not prove it holds the mesh token (or holds another one); nothing of its
    was accepted."""


class ChannelClosedError(TransferError):
    """The channel (or its manager) was closed locally."""


def as_transfer_error(exc: BaseException, context: str) -> TransferError:
    """``exc`` itself if it is ours, else a :class:`ChannelBrokenError` caused by it (torch raises
    plain ``RuntimeError``/``DistNetworkError`` for dead peers, closed stores and timeouts)."""
    if isinstance(exc, TransferError):
        return exc
    error = ChannelBrokenError(f"{context}: {exc}")
    error.__cause__ = exc
    return error
