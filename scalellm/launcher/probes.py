"""Readiness probes: the standard gRPC health protocol, the gateway's HTTP /health, free ports."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any


def grpc_serving(address: str, service: str = "", timeout_s: float = 1.0) -> bool:
    """True when the gRPC server at address reports `service` SERVING (grpc.health.v1). Health
    needs no mesh token; mesh TLS (SCALELLM_MESH_TLS_*) is used when this process has it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from scalellm.security import SecurityConfig

    with SecurityConfig.from_env().load().sync_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # its stubs (types-grpcio-health-checking) omit Check
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_health(url: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """The JSON body of a 200 answer from url, or None (refused, not 200, not JSON). An https URL
    is our own gateway on loopback, whose certificate names its public host: the body (worker
    counts) is read without checking the certificate, and nothing is sent but the GET."""
    context = ssl._create_unverified_context() if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            body = json.loads(response.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return body if isinstance(body, dict) else {}


def port_free(host: str, port: int) -> bool:
    """True when host:port can be bound right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    """`python -m scalellm.launcher.probes HOST:PORT [SERVICE]`: exit 0 when SERVING, else 1
    (a container healthcheck over the standard gRPC health protocol)."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m scalellm.launcher.probes HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    address, service = args[0], args[1] if len(args) == 2 else ""
    serving = grpc_serving(address, service, timeout_s=3.0)
    print(f"{address} {service or '(server)'}: {'SERVING' if serving else 'NOT SERVING'}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
