"""SSE framing, OpenAI response shapes, the config, API keys, and the gateway staying torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scalellm.types import FinishReason, SamplingParams, Timings, TokenLogprobs, Usage
from services.gateway.admission import ApiKeys, KeyRefused, ServedModel
from services.gateway.config import GatewayConfig
from services.gateway.openai_format import SSE_DONE, OpenAIFormatter, parse_events, sse_event
from services.gateway.openai_parse import parse_chat, parse_completion
from services.gateway.request import ChoiceUpdate, ErrorKind, GenerationRequest, invalid

ROOT = Path(__file__).resolve().parents[2]


def test_sse_framing() -> None:
    assert sse_event({"a": "é😀", "b": [1, None]}) == 'data: {"a":"é😀","b":[1,null]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert parse_events(sse_event({"x": 1}) + sse_event({"y": "a\nb"}) + SSE_DONE) == [
        {"x": 1},
        {"y": "a\nb"},
        "[DONE]",
    ]
    with pytest.raises(ValueError):
        sse_event({"x": float("nan")})


def test_error_body_is_openais() -> None:
    assert invalid("bad n", "n", "invalid_value").to_openai() == {
        "error": {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}
    }
    assert ErrorKind.OVERLOADED.http_status == 429 and ErrorKind.UNAVAILABLE.http_status == 503


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> ServedModel:
    return ServedModel(demo_model_dir, GatewayConfig())


def request(n: int = 1) -> GenerationRequest:
    return GenerationRequest(
        request_id="r1", model="smol", prompts=((1, 2, 3),), sampling=SamplingParams(max_tokens=5, n=n)
    )


def test_chat_stream_chunks(model: ServedModel) -> None:
    call = parse_chat(
        {
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    fmt = OpenAIFormatter(call, request(), model, timings=True)
    first = fmt.chunk(ChoiceUpdate(0, [9], ""))
    assert (
        first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-r1" and first["usage"] is None
    )
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert fmt.chunk(ChoiceUpdate(0, [9], "")) is None  # nothing new to show
    assert fmt.chunk(ChoiceUpdate(0, [9], "Hi"))["choices"][0]["delta"] == {"content": "Hi"}
    end = ChoiceUpdate(
        0, [2], "", finish=FinishReason.STOP, usage=Usage(3, 3, 1), timings=Timings(gateway=0.001, total=0.5)
    )
    last = fmt.chunk(end)["choices"][0]
    assert last["finish_reason"] == "stop" and last["delta"] == {} and last["timings"]["total"] == 0.5
    usage = fmt.usage_chunk()
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 1},
    }  # fmt: skip


def test_completion_response_with_logprobs_and_n(model: ServedModel) -> None:
    call = parse_completion({"prompt": "x", "n": 2, "logprobs": 1})
    fmt = OpenAIFormatter(call, request(n=2), model)
    tok = model.tokenizer.encode("Hello")[0]
    lp = TokenLogprobs(tok, -0.5, ((tok, float("-inf")),))
    for index in (0, 1):
        fmt.add(ChoiceUpdate(index, [tok], "Hello", [lp]))
        fmt.add(
            ChoiceUpdate(
                index, [tok], "Hello", [lp], FinishReason.LENGTH, usage=Usage(3, 2), timings=Timings()
            )
        )
    out = fmt.response()
    assert out["object"] == "text_completion" and out["id"] == "cmpl-r1" and "usage" in out
    assert [c["text"] for c in out["choices"]] == ["HelloHello"] * 2 and out["choices"][1][
        "finish_reason"
    ] == "length"
    assert out["choices"][0]["logprobs"] == {
        "tokens": ["Hello", "Hello"], "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"Hello": -9999.0}, {"Hello": -9999.0}], "text_offset": [0, 5],
    }  # fmt: skip
    assert "timings" not in out["choices"][0]
    assert (
        out["usage"]["prompt_tokens"] == 3 and out["usage"]["completion_tokens"] == 4
    )  # prompt counted once
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("api", ["chat", "completions"])
@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("logprobs", [False, True])
def test_stream_events_are_the_chunks_bytes(
    model: ServedModel, api: str, usage: bool, logprobs: bool
) -> None:
    """The pre-encoded mid-stream events equal the JSON encoder's, whatever the text holds."""
    body: dict[str, object] = {"stream": True, "n": 2}
    if usage:
        body["stream_options"] = {"include_usage": True}
    if logprobs:
        body["logprobs"] = True if api == "chat" else 1
    if api == "chat":
        call = parse_chat({**body, "messages": [{"role": "user", "content": "x"}]})
    else:
        call = parse_completion({**body, "prompt": "x"})
    fast, slow = OpenAIFormatter(call, request(n=2), model), OpenAIFormatter(call, request(n=2), model)
    slow.created = fast.created
    tok = model.tokenizer.encode("Hello")[0]
    lp = [TokenLogprobs(tok, -0.5)]
    texts = ["", "Hi", "", ' "quoted" \\ back\nslash\t', "é😀\u2028\x00\x1f", "</script>", "plain"]
    updates = [ChoiceUpdate(i, [tok], t, lp if k % 2 else ()) for k, t in enumerate(texts) for i in (0, 1)]
    updates += [
        ChoiceUpdate(i, [tok], "end", lp, FinishReason.LENGTH, usage=Usage(3, 8), timings=Timings())
        for i in (1, 0)
    ]
    for update in updates:
        chunk = slow.chunk(update)
        assert fast.event(update) == (None if chunk is None else sse_event(chunk))
    assert set(fast._text_events) == {0, 1} and None not in fast._text_events.values()  # taken


def test_config_flags_env_and_validation() -> None:
    env = {
        "SCALELLM_GATEWAY_HTTP_PORT": "9000",
        "SCALELLM_GATEWAY_DECODE_ADDR": "a:1, b:2",
        "SCALELLM_GATEWAY_MAX_N": "4",
    }
    config = GatewayConfig.from_args(["--max-n", "8", "--prefill-addr", "p:3"], env)
    assert config.http_port == 9000 and config.max_n == 8 and config.decode_addrs == ("a:1", "b:2")
    assert config.prefill_addrs == ("p:3",)
    config = GatewayConfig.from_args(["--kvstore", "k:1,k:2", "--kvstore", "k:3"], {})
    assert config.kvstore == ("k:1", "k:2", "k:3") and config.decode_addrs == ()
    for argv in (["--max-n", "0"], ["--kvstore", "k:1", "--decode-addr", "d:1"], ["--event-loop", "trio"]):
        with pytest.raises(SystemExit):
            GatewayConfig.from_args(argv, {})
    with pytest.raises(SystemExit):
        GatewayConfig.from_args([], {"SCALELLM_GATEWAY_MAX_N": "many"})


def test_api_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("\n# comment\nsk-1 acme\nsk-2\n")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="other users may read"):
        ApiKeys.load(path)  # a keys file others can read is refused
    path.chmod(0o600)
    keys = ApiKeys.load(path)
    assert keys.tenant("Bearer sk-1") == "acme" and keys.tenant("bearer  sk-2 ") == "default"
    reasons = ["missing", "missing", "malformed", "malformed", "malformed", "unknown"]
    for header, reason in zip(
        (None, "", "sk-1", "Basic sk-1", "Bearer", "Bearer sk-3"), reasons, strict=True
    ):
        with pytest.raises(KeyRefused) as err:
            keys.tenant(header)
        assert err.value.kind is ErrorKind.UNAUTHENTICATED and err.value.reason.value == reason
    assert ApiKeys.disabled().tenant(None) == "anonymous"
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no API keys"):
        ApiKeys.load(path)


def test_gateway_never_imports_torch() -> None:
    """The gateway stays lean: none of the model stack is imported (what keeps its start fast)."""
    heavy = ("torch", "transformers", "numpy", "safetensors")
    code = f"import sys, services.gateway.__main__; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
