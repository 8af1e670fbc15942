"""The gateway's converter between OpenAI JSON and the shared types: a bad value is one 400 that
names the field as the client spelt it, whichever check (JSON type or SamplingParams) caught it."""

from __future__ import annotations

from typing import Any

import pytest

from scalellm.types import FinishReason, Timings, Usage
from scalellm.types.proto import sampling_to_proto
from scalellm.v1 import common_pb2, gateway_pb2
from services.gateway.openai_convert import finish_reason_to_openai, timings_to_openai, usage_to_openai
from services.gateway.openai_parse import parse_chat, parse_completion
from services.gateway.request import ErrorKind, GatewayError
from services.gateway.server import spec_from_proto

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}]}


def _refused(parse: Any, body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        parse(body)
    assert err.value.kind is ErrorKind.INVALID
    return err.value


@pytest.mark.parametrize(
    ("parse", "body", "param", "needle"),
    [
        (parse_completion, {"prompt": "x", "n": 0}, "n", ">= 1"),
        (parse_completion, {"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
        (parse_completion, {"prompt": "x", "logprobs": 21}, "logprobs", "[0, 20]"),
        (parse_completion, {"prompt": "x", "temperature": 3}, "temperature", "[0, 2]"),
        (parse_completion, {"prompt": "x", "top_k": -2}, "top_k", ">= -1"),
        (parse_completion, {"prompt": "x", "seed": -1}, "seed", "2**63"),
        (parse_completion, {"prompt": "x", "stop": ["a", ""]}, "stop", "must not be empty"),
        (parse_completion, {"prompt": "x", "stop": [1]}, "stop", "array of strings"),
        (parse_chat, {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
        (parse_chat, {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ],
)
def test_bad_values_name_the_clients_field(parse: Any, body: dict[str, Any], param: str, needle: str) -> None:
    err = _refused(parse, body)
    assert err.param == param and needle in err.message and err.message.startswith(f"'{param}'")


def test_non_finite_numbers_are_a_400_not_a_crash() -> None:
    err = _refused(parse_completion, {"prompt": "x", "top_p": float("inf")})
    assert (err.param, err.code) == ("top_p", "invalid_value") and "finite" in err.message


def test_top_k_minus_one_means_all() -> None:
    assert parse_completion({"prompt": "x", "top_k": -1}).spec.sampling.top_k == 0


def test_a_top_k_past_int32_means_all_not_a_500() -> None:
    """The fuzzed request that found it: the worker's proto has top_k as an int32."""
    spec = parse_completion({"prompt": "x", "top_k": 2**63}).spec
    assert spec.sampling.top_k == 0
    assert sampling_to_proto(spec.sampling).top_k == 0


def test_grpc_names_sampling_fields_under_sampling() -> None:
    def refused(**fields: Any) -> GatewayError:
        with pytest.raises(GatewayError) as err:
            spec_from_proto(gateway_pb2.GatewayGenerateRequest(text="x", **fields))
        return err.value

    err = refused(sampling=common_pb2.SamplingParams(top_k=-5))
    assert err.param == "sampling.top_k" and err.message.startswith("'sampling.top_k' must be >= -1")
    assert refused(stop=["ok", ""]).param == "stop"


def test_outputs_in_openais_shapes() -> None:
    assert finish_reason_to_openai(FinishReason.LENGTH) == "length" and finish_reason_to_openai(None) is None
    assert usage_to_openai(Usage(5, 3, 2)) == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2},
    }  # fmt: skip
    assert timings_to_openai(Timings(queue=0.1234567, transfer_bytes=9))["queue"] == 0.123457
