"""python -m services.decode --role decode|both --model DIR --listen HOST:PORT --kvstore ADDR"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc

from scalellm.registry import WorkerRole
from scalellm.v1 import worker_pb2_grpc
from scalellm.worker.config import WorkerConfig, parse_worker_args
from scalellm.worker.engine_host import EngineHost
from scalellm.worker.metrics import WorkerMetrics
from scalellm.worker.server import WorkerServer, run_worker
from services.decode.servicer import SERVICE_NAME, DecodeServicer
from services.decode.worker import DecodeWorker


def build_server(config: WorkerConfig) -> WorkerServer:
    metrics = WorkerMetrics()
    worker = DecodeWorker(config, EngineHost(config, metrics), metrics)

    def add(server: grpc.aio.Server) -> str:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(worker), server)
        return SERVICE_NAME

    return WorkerServer(config, worker, metrics, add)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_worker_args(argv, roles=(WorkerRole.DECODE, WorkerRole.BOTH))
    return run_worker(config, build_server)


if __name__ == "__main__":
    sys.exit(main())
