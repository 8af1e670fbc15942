"""The gateway's clients of the decode workers: one long-lived grpc.aio channel per worker address
(WorkerChannels) and on it one DecodeWorker.Session stream (WorkerSession), shared by every
request routed there; SessionCall is one request on it, read like a unary-stream call.

    Dispatcher ── start(request) ──▶ WorkerSession ── SessionRequest ──▶ decode worker
    ChoiceStream ◀── read() ── SessionCall ◀── _read() sorts SessionUpdates ◀── SessionResponse

Why: one gRPC message per token per request made the gateway's event loop (and the worker's) wake
once per request per engine step, and every new request a new call for the worker to accept (tens
of ms under load). On a session an engine step arrives as one message, and a request starts with
one message on an open stream.

A SessionCall reads like a unary-stream call: read() returns each GenerateResponse and then
None; a failure raises WorkerFailure (services/gateway/request.py) with the worker's status code,
the deadline ends it with DEADLINE_EXCEEDED, and cancel() stops the request on the worker. If the
stream breaks (the worker died or stopped), every request on it fails with UNAVAILABLE and the
next request opens a new stream. Streams and channels of workers that left are closed when the
worker set changes: the stream half-closes once its last request ended, so a request that the
client leaves meanwhile is still cancelled on the worker.

Nothing is written before the worker accepted the stream (its headers came): grpc fails a write
that races the stream's end and reports INTERNAL instead of the worker's status, so a refusal (a
missing mesh token) could read as INTERNAL. A stream refused at the door fails its requests with
the refusal's code; one that breaks after it was accepted, with UNAVAILABLE (whatever the write
race made of its status).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Collection

import grpc

from scalellm.security import MeshSecurity
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.request import WorkerFailure

# Fast reconnects after a worker restarts (re-resolving its name within a second: a restarted
# container may keep its hostname and change its IP). Keepalive pings come with every mesh channel:
# a worker that hangs with its connection open fails its streams within 2 x PING_S
# (scalellm/keepalive.py), and the requests on them are retried or migrated.
# Never set grpc.min_reconnect_backoff_ms: gRPC takes its minimum connect timeout from it (default
# 20 s), and at 100 ms a worker slow to finish the handshake (loaded, far away) was unreachable.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
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
        self._leaving: set[asyncio.Task[None]] = set()  # channels closing after their grace

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
            closing = asyncio.get_running_loop().create_task(channel.close(grace=30.0))
            self._leaving.add(closing)  # a task nothing refers to may be collected unfinished
            closing.add_done_callback(self._leaving.discard)

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        await asyncio.gather(*(s.close() for s in sessions.values()), return_exceptions=True)
        channels, self._channels, self._stubs = self._channels, {}, {}
        await asyncio.gather(*(c.close() for c in channels.values()), return_exceptions=True)


# ---- one Session stream --------------------------------------------------------------------------


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class SessionCall:
    """One request on a WorkerSession. read() until EOF; cancel() at any time (idempotent)."""

    def __init__(self, session: WorkerSession, request_id: str, deadline: float) -> None:
        self.request_id = request_id
        self._session = session
        self._messages: collections.deque[worker_pb2.GenerateResponse] = collections.deque()
        self._error: WorkerFailure | None = None
        self._ended = False  # the last message or an error came: nothing more will
        self._waiter: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(deadline - time.perf_counter(), 0.0), self._expire)

    async def read(self) -> worker_pb2.GenerateResponse | None:
        """The next message, or None after the last one; WorkerFailure if the request failed."""
        while not self._messages:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._messages.popleft()

    def cancel(self) -> bool:
        """Stop the request on the worker unless it already ended; True if it was still running."""
        return self._stop(WorkerFailure(grpc.StatusCode.CANCELLED, "cancelled by the gateway"))

    def _deliver(self, update: worker_pb2.SessionUpdate) -> None:
        if self._ended:
            return
        if update.error_code:
            status = _CODES.get(update.error_code, grpc.StatusCode.UNKNOWN)
            self._end(WorkerFailure(status, update.error_message, update.error_param or None))
            return
        self._messages.append(update.response)
        if update.response.finish_reason:
            self._end(None)
        self._wake()

    def _fail(self, error: WorkerFailure) -> None:
        if not self._ended:
            self._end(error)

    def _expire(self) -> None:
        self._stop(WorkerFailure(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))

    def _stop(self, error: WorkerFailure) -> bool:
        """End the request here with error and on the worker, unless it already ended."""
        if self._ended:
            return False
        self._session.cancel(self.request_id)  # before _end: the last request's end half-closes
        self._end(error)
        return True

    def _end(self, error: WorkerFailure | None) -> None:
        self._ended = True
        self._error = error
        self._timer.cancel()
        self._session.forget(self.request_id)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class WorkerSession:
    """One open Session stream to a decode worker; closed for good once it ends (open a new one)."""

    def __init__(
        self, stub: worker_pb2_grpc.DecodeWorkerStub, address: str, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.address = address
        self.closed = False
        self._accepted = False  # the worker's headers came: it took the stream
        self._finishing = False  # finish() was called: half-close once no request runs
        self._calls: dict[str, SessionCall] = {}
        self._outgoing: asyncio.Queue[worker_pb2.SessionRequest | None] = asyncio.Queue()
        self._stream = stub.Session(self._requests(), metadata=metadata)  # the mesh token, if any
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def start(self, request: worker_pb2.GenerateRequest, deadline: float) -> SessionCall:
        """Send request (deadline: a time.perf_counter() value) and return its call."""
        if self.closed or self._finishing:
            raise RuntimeError("start() on a closed session")
        call = SessionCall(self, request.request_id, deadline)
        self._calls[request.request_id] = call
        self._outgoing.put_nowait(worker_pb2.SessionRequest(generate=request))
        return call

    def cancel(self, request_id: str) -> None:
        if not self.closed:
            self._outgoing.put_nowait(worker_pb2.SessionRequest(cancel=request_id))

    def forget(self, request_id: str) -> None:
        self._calls.pop(request_id, None)
        if self._finishing and not self._calls:
            self._half_close()

    @property
    def running(self) -> int:
        return len(self._calls)

    def finish(self) -> None:
        """No new requests; the running ones finish (or are cancelled: their cancels still go
        out), then the stream half-closes and the worker ends it."""
        if not self._finishing:
            self._finishing = True
            if not self._calls:
                self._half_close()

    def _half_close(self) -> None:
        if not self.closed:
            self._outgoing.put_nowait(None)  # nothing is written after this

    async def close(self) -> None:
        """End the stream now; requests still running fail with UNAVAILABLE."""
        self._stream.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _requests(self) -> AsyncIterator[worker_pb2.SessionRequest]:
        await self._stream.initial_metadata()  # the worker's headers, or the refusal's end
        if self._stream.done():
            return
        self._accepted = True
        while (message := await self._outgoing.get()) is not None:
            yield message

    async def _read(self) -> None:
        error = WorkerFailure(grpc.StatusCode.UNAVAILABLE, f"decode worker {self.address} ended the session")
        try:
            while (response := await self._stream.read()) is not grpc.aio.EOF:
                for update in response.updates:
                    call = self._calls.get(update.request_id)
                    if call is not None:
                        call._deliver(update)
        except grpc.aio.AioRpcError as exc:
            broken = self._accepted or exc.code() is grpc.StatusCode.CANCELLED
            code = grpc.StatusCode.UNAVAILABLE if broken else exc.code()
            error = WorkerFailure(code, f"decode worker {self.address}: {exc.code().name} {exc.details()}")
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            self._outgoing.put_nowait(None)  # ends _requests(), and with it grpc's task that reads it
            for call in list(self._calls.values()):
                call._fail(error)  # each one forgets itself
