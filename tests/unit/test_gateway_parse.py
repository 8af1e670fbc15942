"""OpenAI and gRPC requests to GenerationSpecs, and the Preprocessor's limits (no servers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scalellm.models.config import ModelConfig
from scalellm.types import SamplingParams, StructuredOutput
from scalellm.v1 import common_pb2, gateway_pb2
from services.gateway.admission import Preprocessor, ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.openai_convert import parse_json_object
from services.gateway.openai_parse import Api, parse_chat, parse_completion
from services.gateway.request import ChatMessage, ErrorKind, GatewayError, PromptKind
from services.gateway.server import spec_from_proto


def bad(fn, *args) -> GatewayError:  # type: ignore[no-untyped-def]
    with pytest.raises(GatewayError) as err:
        fn(*args)
    assert err.value.kind is ErrorKind.INVALID
    return err.value


def test_completion_maps_every_supported_field() -> None:
    call = parse_completion(
        {
            "model": "m", "prompt": "hi", "max_tokens": 7, "temperature": 0, "top_p": 0.9, "top_k": 5,
            "min_p": 0.05, "seed": 3, "n": 2, "stop": "\n", "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": 2, "ignore_eos": True,
            "stop_token_ids": [5, 6], "skip_special_tokens": False, "include_stop_str_in_output": True, "user": "u",
        }
    )  # fmt: skip
    assert call.api is Api.COMPLETIONS and call.stream and call.include_usage and call.logprobs
    spec = call.spec
    assert spec.model == "m" and spec.prompt.kind is PromptKind.TEXT and spec.prompt.texts == ("hi",)
    assert spec.sampling == SamplingParams(
        temperature=0.0, top_p=0.9, top_k=5, min_p=0.05, seed=3, max_tokens=7,
        stop_token_ids=(5, 6), ignore_eos=True, logprobs=2,
        n=2, stop=("\n",), include_stop_str_in_output=True, skip_special_tokens=False,
    )  # fmt: skip


def test_sampling_controls_and_structured_output_map_to_sampling_params() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    call = parse_chat(
        {
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 9, "presence_penalty": 0.5,
            "frequency_penalty": -1, "repetition_penalty": 1.1, "logit_bias": {"7": 100, "3": -2.5},
            "min_tokens": 2, "bad_words": ["no", "never"], "stream": True,
            "stream_options": {"include_usage": False, "continuous_usage_stats": True},
        }
    )  # fmt: skip
    assert call.continuous_usage and not call.include_usage
    s = call.spec.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1.0, 1.1)
    assert s.logit_bias == ((3, -2.5), (7, 100.0)) and s.min_tokens == 2 and s.bad_words == ("no", "never")
    forms = [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": schema, "strict": True},
                }
            },
            StructuredOutput.json_schema(schema),
        ),
        ({"response_format": {"type": "json_object"}}, StructuredOutput.json_object()),
        ({"response_format": {"type": "text"}}, None),
        ({"guided_json": schema}, StructuredOutput.json_schema(schema)),
        ({"guided_regex": "[a-z]+"}, StructuredOutput.regex("[a-z]+")),
        ({"guided_choice": ["yes", "no"]}, StructuredOutput.choice(["yes", "no"])),
        ({"guided_grammar": 'root ::= "a"'}, StructuredOutput.lark('root ::= "a"')),
        ({"structured_outputs": {"json": schema}}, StructuredOutput.json_schema(schema)),
        ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutput.regex("[a-z]+")),
        ({"structured_outputs": {"choice": ["a", "b"], "disable_fallback": True}}, StructuredOutput.choice(["a", "b"])),
        ({"structured_outputs": {"grammar": 'start: "a"'}}, StructuredOutput.lark('start: "a"')),
        ({"structured_outputs": {"json_object": True, "disable_any_whitespace": True}}, StructuredOutput.json_object()),
    ]  # fmt: skip
    for extra, want in forms:
        assert parse_completion({"prompt": "x", **extra}).spec.sampling.structured_output == want
    salted = parse_chat({"messages": [{"role": "user", "content": "x"}], "cache_salt": "k3y"})
    assert salted.spec.sampling.cache_salt == "k3y"
    for bad in ("", 7):
        with pytest.raises(GatewayError) as err:
            parse_completion({"prompt": "x", "cache_salt": bad})
        assert err.value.param == "cache_salt"
    assert StructuredOutput.choice(['say "hi"', "x|y"]).spec == 'start: "say \\"hi\\"" | "x|y"'


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": 5}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " *"}}, "structured_outputs.whitespace_pattern"),
        ({"structured_outputs": {"regex": "a", "typo": 1}}, "structured_outputs.typo"),
        ({"structured_outputs": ["a"]}, "structured_outputs"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"guided_grammar": ["x"]}, "guided_grammar"),
        ({"guided_choice": ["a"], "structured_outputs": {"regex": "a"}}, "guided_choice"),
    ],
)  # fmt: skip
def test_a_bad_structured_output_names_its_field(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse_completion({"prompt": "x", **extra})
    assert err.value.kind is ErrorKind.INVALID and err.value.param == param, err.value


def test_completion_defaults_follow_openai() -> None:
    spec = parse_completion({"prompt": [1, 2, 3]}).spec
    assert spec.prompt.token_ids == ((1, 2, 3),) and spec.default_max_tokens == 16
    assert spec.sampling.temperature == 1.0 and spec.sampling.top_p == 1.0 and spec.sampling.logprobs is None
    batch = parse_completion({"prompt": [[1], [2, 3]]}).spec.prompt
    assert batch.kind is PromptKind.TOKENS and batch.count == 2
    assert parse_completion({"prompt": ["a", "b"]}).spec.prompt.texts == ("a", "b")


def test_chat_maps_messages_and_logprobs() -> None:
    call = parse_chat(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
                {"role": "assistant", "content": None},
            ],
            "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 9,
        }
    )  # fmt: skip
    assert call.api is Api.CHAT and call.logprobs and call.spec.sampling.logprobs == 3
    assert call.spec.sampling.max_tokens == 9 and call.spec.default_max_tokens is None
    assert call.spec.prompt.messages == (
        ChatMessage("system", "be brief"), ChatMessage("user", "a\nb", "x"), ChatMessage("assistant", ""),
    )  # fmt: skip
    assert (
        parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True}).spec.sampling.logprobs
        == 0
    )
    assert parse_chat({"messages": [{"role": "user", "content": "x"}]}).spec.sampling.logprobs is None


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (b'{"a": Infinity}', "Infinity"),
        (b"\xff", "not valid JSON"),
    ],
)
def test_malformed_bodies(raw: bytes, needle: str) -> None:
    assert needle in bad(parse_json_object, raw).message


def test_errors_name_the_field_and_say_why() -> None:
    e = bad(parse_completion, {"prompt": "x", "top_p": 0})
    assert (e.param, e.code) == ("top_p", "invalid_value") and "(0, 1]" in e.message
    e = bad(parse_completion, {"prompt": "x", "max_tokens": True})
    assert e.param == "max_tokens" and "integer" in e.message and "boolean" in e.message
    e = bad(parse_chat, {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]})
    assert (e.param, e.code) == ("functions", "unsupported_parameter") and "not supported" in e.message
    e = bad(parse_chat, {"messages": [{"role": "user", "content": "x"}], "temprature": 1})
    assert (e.param, e.code) == ("temprature", "unknown_parameter")


def test_grpc_request_maps_to_the_same_spec() -> None:
    request = gateway_pb2.GatewayGenerateRequest(
        text="hi",
        sampling=common_pb2.SamplingParams(temperature=0.5, top_k=3, seed=9, max_tokens=4, logprobs=1),
        n=2, stop=["x", "x", "y"], keep_special_tokens=True, priority=-1, bad_words=["no"],
    )  # fmt: skip
    spec = spec_from_proto(request)
    assert spec.prompt.texts == ("hi",) and spec.priority == -1
    assert spec.sampling == SamplingParams(
        temperature=0.5, top_p=1.0, top_k=3, seed=9, max_tokens=4, logprobs=1,
        n=2, stop=("x", "y"), skip_special_tokens=False, bad_words=("no",),
    )  # fmt: skip
    unset = spec_from_proto(gateway_pb2.GatewayGenerateRequest(text="hi"))
    assert unset.sampling.n == 1 and unset.sampling.temperature == 0 and unset.sampling.max_tokens is None
    assert (
        bad(
            spec_from_proto,
            gateway_pb2.GatewayGenerateRequest(text="x", sampling=common_pb2.SamplingParams(min_p=2)),
        ).param
        == "sampling.min_p"
    )


def test_the_context_length_is_the_one_the_engine_reads(demo_model_dir: Path, tmp_path: Path) -> None:
    """The gateway's limits start from the ModelConfig the workers' engines read: the position
    table, within the sliding window when there is one; a folder no worker could load is refused."""
    for f in demo_model_dir.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    raw = json.loads((demo_model_dir / "config.json").read_text())
    windowed = {**raw, "architectures": ["MistralForCausalLM"], "max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps({**windowed, "sliding_window": 1000}))
    model = ServedModel(tmp_path, GatewayConfig())
    assert model.context_length == ModelConfig.from_dir(tmp_path).context_length == 1000
    assert (model.limits.max_prompt_tokens, model.limits.max_total_tokens) == (999, 1000)
    (tmp_path / "config.json").write_text(json.dumps(windowed))
    assert ServedModel(tmp_path, GatewayConfig()).limits.max_total_tokens == 4096
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        ServedModel(tmp_path, GatewayConfig())
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="lacks vocab_size"):
        ServedModel(tmp_path, GatewayConfig())


@pytest.fixture(scope="module")
def pre(demo_model_dir: Path) -> Preprocessor:
    config = GatewayConfig(max_prompt_tokens=32, max_total_tokens=64, max_n=4, max_stop_strings=2)
    return Preprocessor(ServedModel(demo_model_dir, config), config)


async def test_preprocessor_limits_and_max_tokens(pre: Preprocessor) -> None:
    req = await pre.prepare(parse_completion({"prompt": "Hello world"}).spec, "t", 1.0)
    assert (
        req.prompts == (tuple(pre.model.tokenizer.encode("Hello world")),) and req.sampling.max_tokens == 16
    )
    assert req.tenant == "t" and req.received_at == 1.0 and len(req.request_id) == 32
    chat = await pre.prepare(parse_chat({"messages": [{"role": "user", "content": "hi"}]}).spec, "t", 0.0)
    assert chat.sampling.max_tokens == 64 - len(chat.prompts[0])  # chat default: the rest of the room
    for body, param in [
        ({"prompt": "word " * 40}, "prompt"),
        ({"prompt": "x", "max_tokens": 64}, "max_tokens"),
        ({"prompt": "x", "n": 5}, "n"),
        ({"prompt": ["a", "b", "c"], "n": 2}, "n"),
        ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
    ]:
        with pytest.raises(GatewayError) as err:
            await pre.prepare(parse_completion(body).spec, "t", 0.0)
        assert err.value.param == param, body
    with pytest.raises(GatewayError) as err:
        await pre.prepare(parse_completion({"model": "other", "prompt": "x"}).spec, "t", 0.0)
    assert err.value.kind is ErrorKind.NOT_FOUND and err.value.code == "model_not_found"
