"""What the mesh's security checks cost per request, measured side by side in one run.

  token check       MeshToken.matches on the presented value (what TokenInterceptor does per call)
  api key lookup    ApiKeys.tenant("Bearer ...") of the gateway (a SHA-256 and a dict probe)
  transfer tag      sealing and checking one SEND announcement of a KV transfer (PairSession)
  grpc unary        a real loopback round trip (grpc.aio, one small message) to a server set up
                    like a worker's (the error interceptor) without and with the token check (the
                    token sent as metadata), interleaved round by round: their ratio and difference.
                    The gateway pays this once per Session stream, a decode worker once per Prefill.

Reports medians (and p90 for the round trips) in microseconds; the machine is printed first.

    python bench/security_overhead.py [--calls 2000] [--rounds 5] [--out result.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from scalellm.security import MeshSecurity, MeshToken
from scalellm.transfer.auth import PairSession
from scalellm.transfer.rendezvous import Control, ControlMessage
from scalellm.worker.errors import ErrorInterceptor
from services.gateway.admission import ApiKeys

METHOD = "/bench.Echo/Unary"


def per_call_us(fn: Callable[[], object], calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` batches of the mean time of one call, in microseconds."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def micro(calls: int) -> dict[str, float]:
    token = MeshToken.generate()
    presented = token.value
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "keys"
        path.write_text("".join(f"sk-{i:06d} tenant-{i % 7}\n" for i in range(1000)))
        os.chmod(path, 0o600)
        keys = ApiKeys.load(path)
    session = PairSession(b"k" * 32)
    frame = ControlMessage(Control.SEND, 123, "17,40,3,30,1769472;120,3")

    def seal_and_check() -> bool:
        return session.is_sealed(session.seal(frame))

    return {
        "token_check_us": per_call_us(lambda: token.matches(presented), calls * 10),
        "api_key_lookup_us": per_call_us(lambda: keys.tenant("Bearer sk-000500"), calls * 10),
        "transfer_tag_us": per_call_us(seal_and_check, calls * 10),
    }


async def _server(security: MeshSecurity) -> tuple[grpc.aio.Server, int]:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server(interceptors=[*security.interceptors(), ErrorInterceptor()])
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def round_trips(calls: int, rounds: int) -> dict[str, dict[str, float]]:
    secured = MeshSecurity(token=MeshToken.generate())
    plain_server, plain_port = await _server(MeshSecurity())
    token_server, token_port = await _server(secured)
    samples: dict[str, list[float]] = {"plain": [], "token": []}
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{plain_port}") as plain,
            grpc.aio.insecure_channel(f"127.0.0.1:{token_port}") as with_token,
        ):
            paths = {
                "plain": (plain.unary_unary(METHOD), ()),
                "token": (with_token.unary_unary(METHOD), secured.metadata),
            }
            for call, metadata in paths.values():  # warm both connections up
                for _ in range(50):
                    await call(b"x" * 64, metadata=metadata)
            for _ in range(rounds):
                for name, (call, metadata) in paths.items():
                    for _ in range(calls):
                        start = time.perf_counter()
                        await call(b"x" * 64, metadata=metadata)
                        samples[name].append((time.perf_counter() - start) * 1e6)
    finally:
        await plain_server.stop(0)
        await token_server.stop(0)
    out = {
        name: {"p50_us": statistics.median(v), "p90_us": statistics.quantiles(v, n=10)[-1]}
        for name, v in samples.items()
    }
    out["token_over_plain"] = {
        "p50_ratio": out["token"]["p50_us"] / out["plain"]["p50_us"],
        "p50_difference_us": out["token"]["p50_us"] - out["plain"]["p50_us"],
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per path and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = parser.parse_args()
    machine = f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, grpcio {grpc.__version__}"
    result = {
        "machine": machine,
        "micro": micro(args.calls),
        "grpc_unary": asyncio.run(round_trips(args.calls, args.rounds)),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
