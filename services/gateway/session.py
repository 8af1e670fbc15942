"""WorkerSession: the gateway's one DecodeWorker.Session stream to a decode worker, shared by every
request routed there; SessionCall: one request on it, read like a unary-stream call.

    Dispatcher ── start(request) ──▶ WorkerSession ── SessionRequest ──▶ decode worker
    ChoiceStream ◀── read() ── SessionCall ◀── _read() sorts SessionUpdates ◀── SessionResponse

Why: one gRPC message per token per request made the gateway's event loop (and the worker's) wake
once per request per engine step, and every new request a new call for the worker to accept (tens
of ms under load). On a session an engine step arrives as one message, and a request starts with
one message on an open stream.

A SessionCall behaves like the grpc.aio call it replaces: read() returns each GenerateResponse and
then None, failures raise grpc.aio.AioRpcError with the worker's status code (so routing
retries and error mapping stay the same), the deadline ends it with DEADLINE_EXCEEDED, and
cancel() stops the request on the worker. If the stream breaks (the worker died or stopped), every
request on it fails with UNAVAILABLE and the next request opens a new stream.

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
from collections.abc import AsyncIterator

import grpc

from scalellm.v1 import worker_pb2, worker_pb2_grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_EMPTY = grpc.aio.Metadata()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, _EMPTY, _EMPTY, details)


class SessionCall:
    """One request on a WorkerSession. read() until EOF; cancel() at any time (idempotent)."""

    def __init__(self, session: WorkerSession, request_id: str, deadline: float) -> None:
        self.request_id = request_id
        self._session = session
        self._messages: collections.deque[worker_pb2.GenerateResponse] = collections.deque()
        self._error: grpc.aio.AioRpcError | None = None
        self._ended = False  # the last message or an error came: nothing more will
        self._waiter: asyncio.Future[None] | None = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(deadline - time.perf_counter(), 0.0), self._expire)

    async def read(self) -> worker_pb2.GenerateResponse | None:
        """The next message, or None after the last one; AioRpcError if the request failed."""
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
        return self._stop(rpc_error(grpc.StatusCode.CANCELLED, "cancelled by the gateway"))

    def _deliver(self, update: worker_pb2.SessionUpdate) -> None:
        if self._ended:
            return
        if update.error_code:
            code = _CODES.get(update.error_code, grpc.StatusCode.UNKNOWN)
            self._end(rpc_error(code, update.error_message))
            return
        self._messages.append(update.response)
        if update.response.finish_reason:
            self._end(None)
        self._wake()

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        if not self._ended:
            self._end(error)

    def _expire(self) -> None:
        self._stop(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))

    def _stop(self, error: grpc.aio.AioRpcError) -> bool:
        """End the request here with error and on the worker, unless it already ended."""
        if self._ended:
            return False
        self._end(error)
        self._session.cancel(self.request_id)
        return True

    def _end(self, error: grpc.aio.AioRpcError | None) -> None:
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
        self._calls: dict[str, SessionCall] = {}
        self._outgoing: asyncio.Queue[worker_pb2.SessionRequest | None] = asyncio.Queue()
        self._stream = stub.Session(self._requests(), metadata=metadata)  # the mesh token, if any
        self._reader = asyncio.get_running_loop().create_task(self._read())

    def start(self, request: worker_pb2.GenerateRequest, deadline: float) -> SessionCall:
        """Send request (deadline: a time.perf_counter() value) and return its call."""
        if self.closed:
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

    @property
    def running(self) -> int:
        return len(self._calls)

    def finish(self) -> None:
        """Half-close: the requests still running finish, then the worker ends the stream."""
        if not self.closed:
            self._outgoing.put_nowait(None)

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
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"decode worker {self.address} ended the session")
        try:
            while (response := await self._stream.read()) is not grpc.aio.EOF:
                for update in response.updates:
                    call = self._calls.get(update.request_id)
                    if call is not None:
                        call._deliver(update)
        except grpc.aio.AioRpcError as exc:
            broken = self._accepted or exc.code() is grpc.StatusCode.CANCELLED
            code = grpc.StatusCode.UNAVAILABLE if broken else exc.code()
            error = rpc_error(code, f"decode worker {self.address}: {exc.code().name} {exc.details()}")
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            self._outgoing.put_nowait(None)  # ends _requests(), and with it grpc's task that reads it
            for call in list(self._calls.values()):
                call._fail(error)  # each one forgets itself
