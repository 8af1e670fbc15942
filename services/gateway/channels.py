"""WorkerChannels: one long-lived grpc.aio channel (and stub) per worker address, and on it one
Session stream (services/gateway/session.py), reused by every request; those of workers that left
are closed when the worker set changes."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import grpc

from scalellm.security import MeshSecurity
from scalellm.v1 import worker_pb2_grpc
from services.gateway.session import WorkerSession

# Fast reconnects after a worker restarts (re-resolving its name within a second: a restarted
# container may keep its hostname and change its IP); pings keep idle HTTP/2 connections warm.
# Never set grpc.min_reconnect_backoff_ms: gRPC takes its minimum connect timeout from it (default
# 20 s), and at 100 ms a worker slow to finish the handshake (loaded, far away) was unreachable.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


class WorkerChannels:
    """Stubs of the decode workers by address; channels are created on first use, with the mesh
    token and mesh TLS when ``security`` has them."""

    def __init__(self, security: MeshSecurity | None = None) -> None:
        self._security = security or MeshSecurity()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.DecodeWorkerStub] = {}
        self._sessions: dict[str, WorkerSession] = {}

    def decode_stub(self, address: str) -> worker_pb2_grpc.DecodeWorkerStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = self._security.channel(address, CHANNEL_OPTIONS)
            self._channels[address] = channel
            stub = self._stubs[address] = worker_pb2_grpc.DecodeWorkerStub(channel)
        return stub

    def session(self, address: str) -> WorkerSession:
        """The open Session stream to the decode worker at address (a new one if the last ended)."""
        session = self._sessions.get(address)
        if session is None or session.closed:
            stub, metadata = self.decode_stub(address), self._security.metadata
            session = self._sessions[address] = WorkerSession(stub, address, metadata)
        return session

    def prune(self, live: Collection[str]) -> None:
        """Close channels to addresses no longer in live (calls on them finish or fail first)."""
        for address in [a for a in self._channels if a not in live]:
            self._stubs.pop(address, None)
            session = self._sessions.pop(address, None)
            if session is not None:
                session.finish()  # its running requests finish, then the worker ends the stream
            channel = self._channels.pop(address)
            asyncio.get_running_loop().create_task(channel.close(grace=30.0))

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        await asyncio.gather(*(s.close() for s in sessions.values()), return_exceptions=True)
        channels, self._channels, self._stubs = self._channels, {}, {}
        await asyncio.gather(*(c.close() for c in channels.values()), return_exceptions=True)
