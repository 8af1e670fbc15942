"""The gateway's and the registry client's channel options: quick reconnects, patient connects.

gRPC takes its minimum connect timeout from `grpc.min_reconnect_backoff_ms`: setting that to 100 ms
for quick reconnects made every connection that took longer than 100 ms to finish its handshake (a
loaded worker, a slow network) fail with UNAVAILABLE "timed out before receiving SETTINGS frame".
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest

from scalellm.registry.client import CHANNEL_OPTIONS as REGISTRY_OPTIONS
from scalellm.v1 import worker_pb2, worker_pb2_grpc
from services.gateway.session import CHANNEL_OPTIONS as GATEWAY_OPTIONS


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
