"""python -m services.prefill --model DIR --listen HOST:PORT --kvstore ADDR"""

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
from services.prefill.servicer import SERVICE_NAME, PrefillServicer
from services.prefill.worker import PrefillWorker


def build_server(config: WorkerConfig) -> WorkerServer:
    metrics = WorkerMetrics()
    worker = PrefillWorker(config, EngineHost(config, metrics), metrics)

    def add(server: grpc.aio.Server) -> str:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(worker), server)
        return SERVICE_NAME

    return WorkerServer(config, worker, metrics, add)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_worker_args(argv, roles=(WorkerRole.PREFILL,))
    return run_worker(config, build_server)


if __name__ == "__main__":
    sys.exit(main())
