"""The mesh's channel options: quick reconnects, patient connects, and pings that notice a hung peer.

gRPC takes its minimum connect timeout from `grpc.min_reconnect_backoff_ms`: setting that to 100 ms
for quick reconnects made every connection that took longer than 100 ms to finish its handshake (a
loaded worker, a slow network) fail with UNAVAILABLE "timed out before receiving SETTINGS frame".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from scalellm.keepalive import PING_S
from scalellm.registry.client import CHANNEL_OPTIONS as REGISTRY_OPTIONS
from scalellm.security import MeshSecurity
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.session import CHANNEL_OPTIONS as GATEWAY_OPTIONS
from tests.hung_peer import open_stream, start_server

_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def silent_listener() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel does) but never speaks HTTP/2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("options", [GATEWAY_OPTIONS, REGISTRY_OPTIONS], ids=["gateway", "registry"])
async def test_a_slow_handshake_is_waited_for_not_failed(
    silent_listener: str, options: tuple[tuple[str, int], ...]
) -> None:
    """A call on a channel whose peer has not answered the handshake yet runs into its own deadline
    (the connect attempt is still pending), instead of failing once 100 ms have passed."""
    async with grpc.aio.insecure_channel(silent_listener, options=options) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(worker_pb2.GenerateRequest(request_id="r"), timeout=1.0).read()
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()


# ---- keepalive: a peer that hangs with its connection open (scalellm/keepalive.py) ---------------


@contextlib.contextmanager
def _peer(*args: str) -> Iterator[subprocess.Popen[str]]:
    """tests/hung_peer.py in a process of its own; killed (and continued, if stopped) at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.hung_peer", *args], stdout=subprocess.PIPE, text=True, cwd=_ROOT
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)).strip()


async def _stream_to_hung_server(first: bytes) -> grpc.aio.AioRpcError:
    """The error a gateway-side stream gets once its server stops (SIGSTOP) after one answer to
    ``first``; gives up (TimeoutError) after three pings' time."""
    with _peer("server") as proc:
        port = int(await _line(proc))
        async with MeshSecurity().channel(f"127.0.0.1:{port}", GATEWAY_OPTIONS) as channel:
            call, queue = open_stream(channel)
            queue.put_nowait(first)
            assert await call.read() == first
            os.kill(proc.pid, signal.SIGSTOP)

            async def drain() -> None:
                while await call.read() is not grpc.aio.EOF:
                    pass

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(drain(), 3 * PING_S)
            return err.value


async def _server_call_of_hung_client() -> bool:
    """Whether a worker-side stream ends (cancelled) once its client stops (SIGSTOP); False after
    three pings' time without."""
    ended = asyncio.Event()

    async def stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield await anext(aiter(requests))
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()
        yield b""  # never reached

    server, port = await start_server(stream)
    try:
        with _peer("client", f"127.0.0.1:{port}") as proc:
            assert await _line(proc) == "open"
            os.kill(proc.pid, signal.SIGSTOP)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended.wait(), 3 * PING_S)
            return ended.is_set()
    finally:
        await server.stop(None)


async def test_streams_of_a_peer_that_hangs_end_within_two_pings() -> None:
    """A decode worker that hangs with its connection open (SIGSTOP here) fails the gateway's
    stream with UNAVAILABLE (then its requests retry or migrate), whether it was streaming or
    quiet (a long queue or prefill); a gateway that hangs has its streams cancelled on the worker
    (which frees their KV). Within 2 x PING_S each; gRPC's defaults took 60-70 s, or forever on
    the worker's side."""
    streaming, quiet, server_side = await asyncio.gather(
        _stream_to_hung_server(b"tick"), _stream_to_hung_server(b"hello"), _server_call_of_hung_client()
    )
    assert streaming.code() is grpc.StatusCode.UNAVAILABLE, streaming.details()
    assert quiet.code() is grpc.StatusCode.UNAVAILABLE, quiet.details()
    assert server_side, "the server's call outlived its hung client"


async def test_a_quiet_stream_is_not_sent_away_for_its_pings() -> None:
    """A client pinging a mesh server (every second here) on a stream that carries nothing for
    seconds: the connection stays (gRPC's default server sends it away with GOAWAY
    "too_many_pings" at the third ping), and the stream still answers."""

    async def echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    server, port = await start_server(echo)
    try:
        options = (*GATEWAY_OPTIONS, ("grpc.keepalive_time_ms", 1000))
        async with MeshSecurity().channel(f"127.0.0.1:{port}", options) as channel:
            call, queue = open_stream(channel)
            queue.put_nowait(b"one")
            assert await call.read() == b"one"
            await asyncio.sleep(6)  # six pings, no data either way
            queue.put_nowait(b"two")
            assert await asyncio.wait_for(call.read(), 5) == b"two"
    finally:
        await server.stop(None)
