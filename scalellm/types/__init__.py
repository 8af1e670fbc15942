"""The mesh's wire-neutral request types, defined once and used by gateway, workers and engine.

    errors.py     InvalidParameter (a bad value, naming its field)
    sampling.py   SamplingParams (validated when made)
    structured.py StructuredOutput: a JSON / JSON Schema / regex / Lark constraint
    outputs.py    FinishReason, TokenLogprobs, Usage, Timings
    prefill.py    PrefillTarget, KVDestination, PrefillResult (disaggregated prefill)
    fairness.py   TenantShare (a request's tenant and weight), FairShares (who goes next)
    proto.py      the one converter between these and the scalellm.v1 protos

Torch-free: the gateway imports them. OpenAI's JSON is converted in the gateway
(services/gateway/openai_convert.py), the only place that speaks it.
"""

from __future__ import annotations

from scalellm.types.errors import InvalidParameter
from scalellm.types.fairness import DEFAULT_TENANT, FairShares, TenantShare
from scalellm.types.outputs import FinishReason, Timings, TokenLogprobs, Usage
from scalellm.types.prefill import KVDestination, PrefillResult, PrefillTarget
from scalellm.types.sampling import MAX_LOGPROBS, MAX_STOP_CHARS, SamplingParams
from scalellm.types.structured import StructuredKind, StructuredOutput

__all__ = [
    "DEFAULT_TENANT",
    "MAX_LOGPROBS",
    "MAX_STOP_CHARS",
    "FairShares",
    "FinishReason",
    "InvalidParameter",
    "KVDestination",
    "PrefillResult",
    "PrefillTarget",
    "SamplingParams",
    "StructuredKind",
    "StructuredOutput",
    "TenantShare",
    "Timings",
    "TokenLogprobs",
    "Usage",
]
