"""A gRPC peer in a process of its own, for tests that stop it (SIGSTOP) mid-stream.

    python -m tests.hung_peer server          prints its port; serves /test.Peer/Stream
    python -m tests.hung_peer client ADDRESS  opens a Stream to ADDRESS, prints "open" when the
                                              first answer came, then waits

Stream answers each request at once; after a request b"tick" it sends a message every 0.1 s for
good (a worker streaming tokens), after anything else it is quiet until the next request.
Both ends are built the way the mesh builds its own: MeshSecurity().server() and .channel().
The tests use start_server() and open_stream() for their own ends.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable

import grpc

from scalellm.security import MeshSecurity

METHOD = "/test.Peer/Stream"

Handler = Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]


async def start_server(handler: Handler) -> tuple[grpc.aio.Server, int]:
    """A mesh server on a free loopback port serving ``handler`` as /test.Peer/Stream."""
    server = MeshSecurity().server()
    method: grpc.RpcMethodHandler = grpc.stream_stream_rpc_method_handler(handler)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Peer", {"Stream": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def open_stream(
    channel: grpc.aio.Channel,
) -> tuple[grpc.aio.StreamStreamCall[bytes, bytes], asyncio.Queue[bytes]]:
    """A Stream call on ``channel`` and the queue whose items it sends."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def requests() -> AsyncIterator[bytes]:
        while True:
            yield await queue.get()

    stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(METHOD)
    return stream(requests()), queue


async def ticking(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request
        while request == b"tick":
            await asyncio.sleep(0.1)
            yield b"t"


async def serve() -> None:
    server, port = await start_server(ticking)
    print(port, flush=True)
    await server.wait_for_termination()


async def call(address: str) -> None:
    async with MeshSecurity().channel(address) as channel:
        stream, queue = open_stream(channel)
        queue.put_nowait(b"hello")
        await stream.read()
        print("open", flush=True)
        await stream.read()


if __name__ == "__main__":
    asyncio.run(serve() if sys.argv[1] == "server" else call(sys.argv[2]))
