"""The ranks of a tensor-parallel engine: one scheduler, N processes.

Rank 0 is the engine's own process: scheduler, block manager and sampler live there alone.
Ranks 1..N-1 are child processes (``python -m scalellm.engine.tp_ranks``: a fresh interpreter,
so no caller needs a ``__main__`` guard; the engine's settings travel as JSON) that each hold
their slice of the model and of the KV cache (models/parallel.py) and run every step rank 0
broadcasts:

    rank 0 (LLMEngine.step)                      rank r (follower_main)
    schedule -> [SeqStep] --broadcast (ints)-->  [SeqStep]
    forward: all-reduce after attention / MLP <=> forward
    logits:  all-gather of the vocabulary slices <=> (the same; discarded)
    sample
    close(): broadcast STOP -------------------> exit
    gather_kv(blocks) (a TP prefill worker's push, between steps):
             broadcast GATHER + block ids -------> its heads of those blocks
             gather to rank 0 along the head axis <== (the same)
    scatter_kv(blocks) (a TP decode worker's landed KV, between steps):
             broadcast SCATTER + block ids ------> (the same)
             scatter along the head axis ========> its heads into those blocks

The group is a ProcessGroupGloo built directly on a TCPStore that rank 0 hosts on loopback (no
``init_process_group``, no global state; the transfer layer's pair groups stay separate). A step
is encoded as one int64 tensor (SeqStep.encode), so nothing but integers crosses between ranks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from scalellm.engine.config import EngineConfig
from scalellm.engine.step_inputs import SeqStep
from scalellm.models.config import ModelConfig
from scalellm.models.parallel import TensorParallel

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONNECT_TIMEOUT = timedelta(minutes=5)
"""Rendezvous and collectives: a follower loading a large checkpoint may take minutes."""
JOIN_TIMEOUT_S = 30.0
STOP = -1
GATHER = -2
SCATTER = -3


@dataclass(frozen=True)
class FollowerArgs:
    rank: int
    size: int
    store_port: int
    max_model_len: int
    config: EngineConfig

    def argv(self) -> list[str]:
        settings = json.dumps(dataclasses.asdict(self.config))
        return [str(self.rank), str(self.size), str(self.store_port), str(self.max_model_len), settings]

    @classmethod
    def parse(cls, argv: list[str]) -> FollowerArgs:
        rank, size, port, max_len, settings = argv
        return cls(int(rank), int(size), int(port), int(max_len), EngineConfig(**json.loads(settings)))


def open_group(store: dist.Store, rank: int, size: int, expert_parallel: bool = False) -> TensorParallel:
    """This rank's TensorParallel over a gloo group of ``size`` ranks on ``store``."""
    gloo: Any = dist.ProcessGroupGloo
    options = gloo._Options()
    options._timeout = CONNECT_TIMEOUT
    options._devices = [gloo.create_device(hostname=HOST)]
    group = gloo(store, rank, size, options)
    return TensorParallel(rank=rank, size=size, group=group, expert_parallel=expert_parallel)


def broadcast_ints(tp: TensorParallel, values: list[int] | None = None) -> list[int]:
    """Rank 0 sends ``values`` (length first, then the values); every other rank gets them."""
    length = torch.tensor([len(values) if values is not None else 0], dtype=torch.int64)
    tp.group.broadcast(length, 0).wait()
    if tp.rank != 0:
        values = [0] * int(length.item())
    payload = torch.tensor(values, dtype=torch.int64)
    if payload.numel():
        tp.group.broadcast(payload, 0).wait()
    return payload.tolist()


class TPRanks:
    """Rank 0's handle on the follower processes and the group."""

    def __init__(self, tp: TensorParallel, store: dist.Store, procs: list[subprocess.Popen[bytes]]) -> None:
        self.tp = tp
        self._store = store  # rank 0 hosts it: it lives as long as the group
        self._procs = procs
        self._closed = False

    @classmethod
    def start(cls, config: EngineConfig, max_model_len: int) -> TPRanks:
        size = config.tensor_parallel_size
        store = dist.TCPStore(HOST, 0, size, is_master=True, timeout=CONNECT_TIMEOUT, wait_for_workers=False)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    __name__,
                    *FollowerArgs(rank, size, store.port, max_model_len, config).argv(),
                ]
            )
            for rank in range(1, size)
        ]
        try:
            tp = open_group(store, 0, size, config.expert_parallel)
        except BaseException:
            for proc in procs:
                proc.kill()
            cls._reap(procs)
            raise
        log.info("tensor parallel: %d ranks (gloo), followers %s", size, [p.pid for p in procs])
        return cls(tp, store, procs)

    def send_steps(self, steps: list[SeqStep]) -> None:
        broadcast_ints(self.tp, SeqStep.encode(steps))

    def send_gather(self, block_ids: list[int]) -> None:
        """Ask the followers for their heads of ``block_ids`` (ModelRunner.gather_kv)."""
        broadcast_ints(self.tp, [GATHER, *block_ids])

    def send_scatter(self, block_ids: list[int]) -> None:
        """Hand the followers their heads of ``block_ids`` (ModelRunner.scatter_kv)."""
        broadcast_ints(self.tp, [SCATTER, *block_ids])

    def close(self) -> None:
        """Tell the followers to exit and wait for them (killing any that do not)."""
        if self._closed:
            return
        self._closed = True
        try:
            broadcast_ints(self.tp, [STOP])
        except RuntimeError as exc:  # a follower already gone: the rest are reaped below
            log.warning("tensor parallel: stop broadcast failed: %s", exc)
        self._reap(self._procs)

    def kill(self) -> None:
        """Kill the followers at once (rank 0 failed before they could be stopped in order)."""
        self._closed = True
        for proc in self._procs:
            proc.kill()
        self._reap(self._procs)

    @staticmethod
    def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            try:
                proc.wait(JOIN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("tensor parallel: rank process %d did not exit; killing it", proc.pid)
                proc.kill()
                proc.wait()


def follower_main(args: FollowerArgs) -> None:
    """Rank r > 0: build this rank's model and cache, then run each broadcast step until STOP."""
    from scalellm.engine.model_runner import ModelRunner

    assert args.config.model is not None, "rank 0 passes the resolved model folder"
    store = dist.TCPStore(HOST, args.store_port, args.size, is_master=False, timeout=CONNECT_TIMEOUT)
    tp = open_group(store, args.rank, args.size, args.config.expert_parallel)
    model_config = ModelConfig.from_dir(args.config.model)
    runner = ModelRunner(args.config, model_config, args.max_model_len, tp)
    while True:
        values = broadcast_ints(tp)
        if values == [STOP]:
            return
        if values[0] == GATHER:
            runner.gather_kv(values[1:])
        elif values[0] == SCATTER:
            runner.scatter_kv(values[1:], None)
        else:
            runner.run_steps(SeqStep.decode(values))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="tp-rank %(levelname)s %(name)s: %(message)s")
    follower_main(FollowerArgs.parse(sys.argv[1:]))
