"""What a generation produces, per choice: updates with text deltas, usage and timings."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from scalellm.v1 import common_pb2


class Finish(enum.Enum):
    """Why a choice ended (OpenAI's finish_reason strings as values)."""

    STOP = "stop"
    LENGTH = "length"

    @property
    def proto(self) -> int:
        return common_pb2.FINISH_REASON_STOP if self is Finish.STOP else common_pb2.FINISH_REASON_LENGTH


@dataclass(frozen=True, slots=True)
class ChoiceUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Timings:
    """Where a choice's time went, in seconds (common.proto's Timings)."""

    gateway: float = 0.0
    queue: float = 0.0
    prefill: float = 0.0
    transfer: float = 0.0
    decode: float = 0.0
    transfer_bytes: int = 0
    total: float = 0.0  # arrival at the gateway to the worker's last message
    worker_call: float = 0.0  # the decode stream as the gateway saw it: opened to last message

    def to_proto(self) -> common_pb2.Timings:
        return common_pb2.Timings(
            gateway=self.gateway,
            queue=self.queue,
            prefill=self.prefill,
            transfer=self.transfer,
            decode=self.decode,
            transfer_bytes=self.transfer_bytes,
            total=self.total,
            worker_call=self.worker_call,
        )

    def to_json(self) -> dict[str, float | int]:
        return {
            "gateway": round(self.gateway, 6),
            "queue": round(self.queue, 6),
            "prefill": round(self.prefill, 6),
            "transfer": round(self.transfer, 6),
            "decode": round(self.decode, 6),
            "transfer_bytes": self.transfer_bytes,
            "total": round(self.total, 6),
            "worker_call": round(self.worker_call, 6),
        }


@dataclass(slots=True)
class ChoiceUpdate:
    """New output of one choice: one per decode message, the last with finish, usage and timings.

    logprobs holds the worker's TokenLogprobs messages as they came (no copy).
    """

    index: int
    token_ids: Sequence[int]
    text: str
    logprobs: Sequence[common_pb2.TokenLogprobs] = ()
    finish: Finish | None = None
    stop_str: str | None = None
    usage: ChoiceUsage | None = None
    timings: Timings | None = None
