"""A prefill worker that misbehaves on purpose, for failure tests of the real decode worker.

No real prefill worker can be made to do these on cue: a real one answers Prefill only after its
KV push finished, and is either running or dead. This one, served on the test's event loop:

- ``stall``: answers Prefill at once and never pushes the KV (a stalled, not dead, peer);
- ``hang``: answers nothing until the test sets ``release``, then fails with UNAVAILABLE (the
  decode worker then falls back as for any failed prefill).

It counts the calls it got, answered and saw cancelled.
"""

from __future__ import annotations

import asyncio
import enum

import grpc

from scalellm.v1 import worker_pb2, worker_pb2_grpc


class Mode(enum.Enum):
    STALL = "stall"
    HANG = "hang"


class FakePrefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, mode: Mode, first_token: int = 0) -> None:
        self.mode = mode
        self.first_token = first_token
        self.release = asyncio.Event()
        self.requests: list[worker_pb2.PrefillRequest] = []
        self.answered = 0
        self.cancelled = 0
        self.address = ""
        self._server: grpc.aio.Server | None = None

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        self.requests.append(request)
        try:
            if self.mode is Mode.STALL:
                self.answered += 1
                return worker_pb2.PrefillResponse(first_token_id=self.first_token)
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the fake prefill worker was released")
        raise AssertionError("unreachable: abort raises")

    async def __aenter__(self) -> FakePrefill:
        self._server = grpc.aio.server()
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        if self._server is not None:
            await self._server.stop(0)

    def target(self, worker_id: str) -> worker_pb2.PrefillTarget:
        return worker_pb2.PrefillTarget(worker_id=worker_id, address=self.address)
