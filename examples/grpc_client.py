"""A streaming gRPC client of the gateway: prints text as it arrives, then usage and timings.

    python examples/grpc_client.py --address 127.0.0.1:50051 "What is the capital of France?"
    python examples/grpc_client.py --chat --n 2 --max-tokens 32 --stop "." "Tell me a joke"

Only the generated modules under scalellm/v1 are needed (or any client generated from
protos/scalellm/v1/gateway.proto; the server also serves reflection, so grpcurl works too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalellm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def build_request(args: argparse.Namespace) -> gateway_pb2.GatewayGenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    request = gateway_pb2.GatewayGenerateRequest(sampling=sampling, n=args.n, stop=args.stop)
    if args.chat:
        request.chat.messages.add(role="user", content=args.prompt)
    else:
        request.text = args.prompt
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prompt")
    parser.add_argument("--address", default="127.0.0.1:50051", help="the gateway's gRPC host:port")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user message")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--n", type=int, default=1, help="independent choices")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY'")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline; passing it cancels the work")
    args = parser.parse_args(argv)

    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    texts: dict[int, str] = {}
    with grpc.insecure_channel(args.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for message in stub.Generate(build_request(args), timeout=args.timeout, metadata=metadata):
                texts[message.index] = texts.get(message.index, "") + message.text
                if args.n == 1:
                    print(message.text, end="", flush=True)
                if message.finish_reason:
                    reason = common_pb2.FinishReason.Name(message.finish_reason)
                    t, u = message.timings, message.usage
                    print(
                        f"\n[choice {message.index}: {reason} {message.stop_str!r} | "
                        f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens | "
                        f"gateway {t.gateway * 1e3:.1f} ms, queue {t.queue * 1e3:.1f} ms, "
                        f"prefill {t.prefill * 1e3:.1f} ms, transfer {t.transfer * 1e3:.1f} ms, "
                        f"decode {t.decode * 1e3:.1f} ms | request {message.request_id}]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as exc:  # INVALID_ARGUMENT names the field; UNAVAILABLE: no worker...
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.n > 1:
        for index in sorted(texts):
            print(f"--- choice {index}\n{texts[index]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
