"""The mesh's wire-neutral request types, defined once and used by gateway, workers and engine.

    sampling.py   SamplingParams (validated when made), InvalidParameter
    outputs.py    FinishReason, TokenLogprobs, Usage, Timings
    prefill.py    PrefillTarget, KVDestination, PrefillResult (disaggregated prefill)
    proto.py      the one converter between these and the scalellm.v1 protos

Torch-free: the gateway imports them. OpenAI's JSON is converted in the gateway
(services/gateway/openai_convert.py), the only place that speaks it.
"""

from __future__ import annotations

from scalellm.types.outputs import FinishReason, Timings, TokenLogprobs, Usage
from scalellm.types.prefill import KVDestination, PrefillResult, PrefillTarget
from scalellm.types.sampling import MAX_LOGPROBS, MAX_STOP_CHARS, InvalidParameter, SamplingParams

__all__ = [
    "MAX_LOGPROBS",
    "MAX_STOP_CHARS",
    "FinishReason",
    "InvalidParameter",
    "KVDestination",
    "PrefillResult",
    "PrefillTarget",
    "SamplingParams",
    "Timings",
    "TokenLogprobs",
    "Usage",
]
