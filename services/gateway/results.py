"""What a generation produces, per choice: updates with text deltas; the last one with finish
reason, usage and timings (the shared types of scalellm.types)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scalellm.types import FinishReason, Timings, TokenLogprobs, Usage


@dataclass(slots=True)
class ChoiceUpdate:
    """New output of one choice: one per decode message, the last with finish, usage and timings."""

    index: int
    token_ids: Sequence[int]
    text: str
    logprobs: Sequence[TokenLogprobs] = ()
    finish: FinishReason | None = None
    stop_str: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
