"""The shared request types (scalellm.types): validated once, converted once to and from the protos."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scalellm.types import (
    FinishReason,
    InvalidParameter,
    KVDestination,
    PrefillResult,
    PrefillTarget,
    SamplingParams,
    Timings,
    TokenLogprobs,
    Usage,
)
from scalellm.types import proto as convert
from scalellm.v1 import common_pb2


def test_sampling_params_normalise_what_they_accept() -> None:
    p = SamplingParams(top_k=-1, stop=["a", "b", "a"], stop_token_ids=[3, 4])  # type: ignore[arg-type]
    assert p.top_k == 0 and p.stop == ("a", "b") and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop="x").stop == ("x",)  # type: ignore[arg-type]
    # a top_k past any vocabulary keeps every token, as 0 does (and fits the wire's int32)
    assert SamplingParams(top_k=2**63).top_k == 0 and SamplingParams(top_k=2**31 - 1).top_k == 2**31 - 1
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


def test_a_bad_value_names_its_field_under_any_boundarys_name() -> None:
    with pytest.raises(InvalidParameter) as err:
        SamplingParams(top_p=0.0)
    assert err.value.field == "top_p" and str(err.value) == "'top_p' must be in (0, 1], got 0"
    assert err.value.message_for("sampling.top_p") == "'sampling.top_p' must be in (0, 1], got 0"
    assert isinstance(err.value, ValueError)
    for kwargs, field in [
        ({"stop": ["x" * 1025]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"seed": 2**63}, "seed"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": float("inf")}, "temperature"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"cache_salt": "s" * 1025}, "cache_salt"),
        ({"cache_salt": 5}, "cache_salt"),
    ]:
        with pytest.raises(InvalidParameter) as err:
            SamplingParams(**kwargs)  # type: ignore[arg-type]
        assert err.value.field == field, kwargs


def test_sampling_round_trips_through_the_proto() -> None:
    full = SamplingParams(
        temperature=0.5, top_p=0.75, top_k=7, min_p=0.125, seed=2**62, max_tokens=9,
        stop_token_ids=(5, 6), ignore_eos=True, logprobs=3,
    )  # fmt: skip
    assert convert.sampling_from_proto(convert.sampling_to_proto(full)) == full
    bare = SamplingParams(temperature=1.0, max_tokens=None)
    msg = convert.sampling_to_proto(bare)
    assert not msg.HasField("seed") and not msg.HasField("logprobs") and msg.max_tokens == 0
    assert convert.sampling_from_proto(msg) == bare
    # Unset proto fields: greedy, top_p 1, up to the context length.
    unset = convert.sampling_from_proto(common_pb2.SamplingParams())
    assert (unset.temperature, unset.top_p, unset.max_tokens, unset.seed) == (0.0, 1.0, None, None)
    with pytest.raises(InvalidParameter, match="min_p"):
        convert.sampling_from_proto(common_pb2.SamplingParams(min_p=2))


def test_finish_reason_maps_both_ways_and_equals_openais_strings() -> None:
    for reason in FinishReason:
        assert convert.finish_reason_from_proto(convert.finish_reason_to_proto(reason)) is reason
    assert convert.finish_reason_to_proto(None) == common_pb2.FINISH_REASON_UNSPECIFIED
    assert convert.finish_reason_from_proto(common_pb2.FINISH_REASON_UNSPECIFIED) is None
    assert FinishReason.STOP == "stop" and FinishReason.LENGTH == "length" and FinishReason.ABORT == "abort"


def test_outputs_round_trip_through_the_proto() -> None:
    lp = TokenLogprobs(7, -0.5, ((7, -0.5), (9, -2.0)))
    assert convert.logprobs_from_proto(convert.logprobs_to_proto(lp)) == lp
    usage = Usage(10, 4, 8)
    assert convert.usage_from_proto(convert.usage_to_proto(usage)) == usage
    timings = Timings(
        gateway=0.5, queue=0.25, prefill=1.5, transfer=0.125, decode=2.0, transfer_bytes=4096,
        total=4.5, worker_call=4.0,
    )  # fmt: skip
    assert convert.timings_from_proto(convert.timings_to_proto(timings)) == timings


def test_prefill_types_round_trip_through_the_proto() -> None:
    target = PrefillTarget("prefill-1", "10.0.0.2:50061")
    assert convert.prefill_target_from_proto(convert.prefill_target_to_proto(target)) == target
    dest = KVDestination("decode-1", "10.0.0.3:29500", 42, 2, (7, 8, 9))
    assert convert.kv_destination_from_proto(convert.kv_destination_to_proto(dest)) == dest
    for logprobs in (None, TokenLogprobs(3, -0.25)):
        result = PrefillResult(3, logprobs, 16, 0.5, 1.0, 0.25, 8192)
        assert convert.prefill_result_from_proto(convert.prefill_result_to_proto(result)) == result


def test_the_types_and_their_proto_converter_import_without_torch() -> None:
    code = "import sys, scalellm.types, scalellm.types.proto; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sampling_controls_are_checked_and_normalised() -> None:
    from scalellm.types import StructuredOutput

    p = SamplingParams(logit_bias={9: 1, 3: -2.5}, bad_words_token_ids=[[4, 5], [6], [4, 5]])  # type: ignore[arg-type]
    assert p.logit_bias == ((3, -2.5), (9, 1.0)) and p.bad_words_token_ids == ((4, 5), (6,))
    assert p.uses_logits_controls and not SamplingParams(temperature=0.3, top_k=5).uses_logits_controls
    assert SamplingParams(structured_output=StructuredOutput.regex("a")).uses_logits_controls
    for kwargs, field in [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {"7": 1}}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words_token_ids": [[]]}, "bad_words_token_ids"),
        ({"bad_words_token_ids": [[1, -2]]}, "bad_words_token_ids"),
        ({"structured_output": "json"}, "structured_output"),
        ({"structured_output": StructuredOutput.json_object(), "ignore_eos": True}, "structured_output"),
        ({"structured_output": StructuredOutput.json_object(), "min_tokens": 2}, "structured_output"),
    ]:
        with pytest.raises(InvalidParameter) as err:
            SamplingParams(**kwargs)  # type: ignore[arg-type]
        assert err.value.field == field, kwargs


def test_structured_output_checks_what_it_can_without_a_vocabulary() -> None:
    from scalellm.types import StructuredKind, StructuredOutput

    assert (
        StructuredOutput.json_schema({"type": "object", "b": 1, "a": 2}).spec
        == '{"type": "object", "b": 1, "a": 2}'
    )
    for make in (
        lambda: StructuredOutput.json_schema("not json"),
        lambda: StructuredOutput.json_schema("[1, 2]"),
        lambda: StructuredOutput.regex(""),
        lambda: StructuredOutput(StructuredKind.JSON_OBJECT, "x"),
        lambda: StructuredOutput.lark("x" * (64 * 1024 + 1)),
        lambda: StructuredOutput.choice([]),
        lambda: StructuredOutput.choice("ab"),  # a string is not a list of choices
        lambda: StructuredOutput.choice(["a", 1]),  # type: ignore[list-item]
    ):
        with pytest.raises(InvalidParameter) as err:
            make()
        assert err.value.field == "structured_output"


def test_every_sampling_control_round_trips_through_the_proto() -> None:
    from scalellm.types import StructuredOutput

    for so in (
        StructuredOutput.json_object(),
        StructuredOutput.json_schema({"type": "string"}),
        StructuredOutput.regex("[a-z]+"),
        StructuredOutput.lark('start: "x"'),
    ):
        full = SamplingParams(
            temperature=0.5, presence_penalty=0.5, frequency_penalty=-0.25, repetition_penalty=1.5,
            logit_bias={5: 3.0, 2: -1.0}, bad_words_token_ids=[[1, 2], [3]], structured_output=so,
            cache_salt="tenant-secret", allowed_token_ids=[7, 3, 9],
        )  # fmt: skip
        assert convert.sampling_from_proto(convert.sampling_to_proto(full)) == full
    held = SamplingParams(min_tokens=4, max_tokens=8)
    assert convert.sampling_from_proto(convert.sampling_to_proto(held)) == held
    unset = common_pb2.SamplingParams()
    assert convert.sampling_from_proto(unset).repetition_penalty == 1.0  # 0 on the wire means unset
    choice = common_pb2.StructuredOutput(choice=common_pb2.Choices(options=["yes", 'say "no"']))
    assert convert.structured_from_proto(choice) == StructuredOutput.choice(["yes", 'say "no"'])
    with pytest.raises(InvalidParameter):
        convert.structured_from_proto(common_pb2.StructuredOutput(choice=common_pb2.Choices()))
    empty = common_pb2.SamplingParams(structured_output=common_pb2.StructuredOutput())
    with pytest.raises(InvalidParameter) as err:
        convert.sampling_from_proto(empty)
    assert err.value.field == "structured_output"
