"""A gRPC peer in a process of its own, for tests that stop it (SIGSTOP) mid-stream.

    python -m tests.hung_peer server          prints its port; serves /test.Peer/Stream
    python -m tests.hung_peer client ADDRESS  opens a Stream to ADDRESS, prints "open" when the
                                              first answer came, then waits

Stream answers each request at once; after a request b"tick" it sends a message every 0.1 s for
good (a worker streaming tokens), after anything else it is quiet until the next request.
Both ends are built the way the mesh builds its own: MeshSecurity().server() and .channel().
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from scalellm.security import MeshSecurity

METHOD = "/test.Peer/Stream"


async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request
        while request == b"tick":
            await asyncio.sleep(0.1)
            yield b"t"


def handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Peer", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
    )


async def serve() -> None:
    server = MeshSecurity().server()
    server.add_generic_rpc_handlers((handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def call(address: str) -> None:
    async with MeshSecurity().channel(address) as channel:
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def requests() -> AsyncIterator[bytes]:
            while True:
                yield await queue.get()

        streaming = channel.stream_stream(METHOD)(requests())
        queue.put_nowait(b"hello")
        await streaming.read()
        print("open", flush=True)
        await streaming.read()


if __name__ == "__main__":
    asyncio.run(serve() if sys.argv[1] == "server" else call(sys.argv[2]))
