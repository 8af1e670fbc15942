"""Malformed and hostile requests against a gateway process in front of a real decode worker on a
tiny model. gRPC: Generate requests built by hypothesis end with OK or a client-error status,
never INTERNAL or UNKNOWN, and the mesh still serves afterwards. HTTP: schemathesis generates
bodies, valid and not, for every route of the gateway's own /openapi.json; none gets a 5xx.

A generated request is read for a few messages, then cancelled (the tiny model could otherwise
generate thousands of tokens): what validation refuses is refused before the first message.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import schemathesis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from scalellm.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.procs import Service, start_service
from tests.service.worker_calls import worker_args

pytestmark = pytest.mark.slow

# What a client may be told about its own request. UNAVAILABLE, INTERNAL, UNKNOWN: a defect.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,  # an unknown model
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # an oversized message
}
READ = 4  # messages read before the call is cancelled


@dataclass
class Mesh:
    gateway: Service
    grpc_address: str
    model: str


@pytest.fixture(scope="module")
def mesh(tiny_chat_model: Path) -> Iterator[Mesh]:
    worker = start_service("services.decode", worker_args(tiny_chat_model, "--role", "both"))
    gateway = start_service(
        "services.gateway",
        ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--model", str(tiny_chat_model),
         "--decode-addr", worker.address],
        name="gateway",
    )  # fmt: skip
    try:
        yield Mesh(gateway, gateway.ready.fields["grpc"], tiny_chat_model.name)
    finally:
        assert gateway.stop() == 0, gateway.log()
        assert worker.stop() == 0, worker.log()


_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -1.0, 1.0, 2.0, 1e-9, 1e30]),
)
_ints = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 511, 512, 49151, 49152, 2**31]))
_texts = st.text(max_size=200) | st.sampled_from(["", "\x00", "\ud7ff" * 3, "<|im_start|>", "{" * 100])


def _mostly(sane: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """Sane values most of the time, so that requests also get past validation and run."""
    return st.integers(0, 9).flatmap(lambda k: hostile if k == 0 else sane)


_structured = st.one_of(
    st.builds(common_pb2.StructuredOutput, json_object=st.booleans()),
    st.builds(common_pb2.StructuredOutput, json_schema=_texts | st.just('{"type": "integer"}')),
    st.builds(common_pb2.StructuredOutput, regex=_texts | st.just("[a-z]+")),
    st.builds(common_pb2.StructuredOutput, lark=_texts),
)


@st.composite
def _sampling(draw: st.DrawFn) -> common_pb2.SamplingParams:
    unit = st.floats(0.0, 1.0, width=32)
    msg = common_pb2.SamplingParams(
        temperature=draw(_mostly(st.floats(0.0, 2.0, width=32), _floats)),
        top_p=draw(_mostly(unit, _floats)), top_k=draw(_mostly(st.integers(0, 50), st.integers(-(2**31), 2**31 - 1))),
        min_p=draw(_mostly(unit, _floats)), max_tokens=draw(_mostly(st.integers(0, 8), _ints)),
        ignore_eos=draw(st.booleans()),
        presence_penalty=draw(_mostly(st.floats(-2.0, 2.0, width=32), _floats)),
        frequency_penalty=draw(_mostly(st.floats(-2.0, 2.0, width=32), _floats)),
        repetition_penalty=draw(_mostly(st.floats(0.5, 2.0, width=32) | st.just(0.0), _floats)),
        min_tokens=draw(_mostly(st.integers(0, 4), _ints)),
        stop_token_ids=draw(_mostly(st.lists(st.integers(0, 500), max_size=3), st.lists(_ints, max_size=4))),
        logit_bias=draw(_mostly(
            st.dictionaries(st.integers(0, 500), st.floats(-100, 100, width=32), max_size=3),
            st.dictionaries(_ints, _floats, max_size=3),
        )),
    )  # fmt: skip
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        msg.logprobs = draw(_mostly(st.integers(0, 5), _ints))
    for seq in draw(st.lists(st.lists(_ints, max_size=3), max_size=2)):
        msg.bad_words_token_ids.add(token_ids=seq)
    if draw(st.integers(0, 4)) == 0:
        msg.structured_output.CopyFrom(draw(_structured))
    return msg


@st.composite
def _requests(draw: st.DrawFn, model: str) -> gateway_pb2.GatewayGenerateRequest:
    msg = gateway_pb2.GatewayGenerateRequest(
        model=draw(_mostly(st.sampled_from([model, ""]), st.just("no-such-model") | _texts)),
        n=draw(_mostly(st.integers(0, 3), _ints)),
        stop=draw(st.lists(_mostly(st.text(min_size=1, max_size=5), _texts), max_size=3)),
        include_stop_str=draw(st.booleans()), keep_special_tokens=draw(st.booleans()),
        priority=draw(_mostly(st.integers(-10, 10), st.integers(-(2**31), 2**31 - 1))),
        bad_words=draw(st.lists(_mostly(st.text(min_size=1, max_size=8), _texts), max_size=2)),
    )  # fmt: skip
    prompt = draw(_mostly(st.sampled_from(["text", "token_ids", "chat"]), st.just("none")))
    if prompt == "text":
        msg.text = draw(_mostly(st.text(min_size=1, max_size=40), _texts))
    elif prompt == "token_ids":
        msg.token_ids.ids.extend(draw(_mostly(st.lists(st.integers(0, 500), min_size=1, max_size=20),
                                              st.lists(_ints, max_size=20))))  # fmt: skip
    elif prompt == "chat":
        for _ in range(draw(st.integers(0, 3))):
            role = draw(_mostly(st.sampled_from(["user", "system", "assistant"]), st.just("tool") | _texts))
            msg.chat.messages.add(role=role, content=draw(_texts))
    if draw(st.booleans()):
        msg.sampling.CopyFrom(draw(_sampling()))
    return msg


def _outcome(stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GatewayGenerateRequest) -> str:
    call = stub.Generate(request, timeout=120)  # a hang guard only
    try:
        for i, _ in enumerate(call):
            if i + 1 >= READ:
                call.cancel()
                return "OK"
        return "OK"
    except grpc.RpcError as exc:
        code = exc.code()
        if code is grpc.StatusCode.CANCELLED and call.cancelled():
            return "OK"
        assert code in CLIENT_ERRORS, (code, exc.details(), request)
        assert exc.details(), (code, request)  # a clear message, never a bare status
        return code.name


def test_malformed_generate_requests_get_client_errors(mesh: Mesh) -> None:
    seen: dict[str, int] = {}
    with grpc.insecure_channel(mesh.grpc_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        @settings(
            max_examples=200,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        @given(_requests(mesh.model))
        def fuzz(request: gateway_pb2.GatewayGenerateRequest) -> None:
            outcome = _outcome(stub, request)
            seen[outcome] = seen.get(outcome, 0) + 1

        fuzz()

        # Both kinds were exercised: the fuzzer is not refused wholesale, nor let through wholesale.
        assert seen.get("OK", 0) > 0 and seen.get("INVALID_ARGUMENT", 0) > 0, seen
        # Still serving: health, and a plain request answers.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        plain = gateway_pb2.GatewayGenerateRequest(
            text="hi", sampling=common_pb2.SamplingParams(max_tokens=4)
        )
        messages = list(stub.Generate(plain, timeout=120))
        assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


# ---- HTTP: the OpenAPI document drives schemathesis ---------------------------------------------


@pytest.fixture(scope="module")
def http_gateway(tiny_chat_model: Path) -> Iterator[str]:
    """A gateway process over a real decode worker whose requests are kept short
    (--max-total-tokens): every generated body gets an answer in milliseconds."""
    worker = start_service("services.decode", worker_args(tiny_chat_model, "--role", "both"))
    gateway = start_service(
        "services.gateway",
        ["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--model", str(tiny_chat_model),
         "--decode-addr", worker.address, "--max-total-tokens", "160"],
        name="gateway-http",
    )  # fmt: skip
    try:
        yield f"http://{gateway.address}"
    finally:
        assert gateway.stop() == 0, gateway.log()
        assert worker.stop() == 0, worker.log()


def test_no_body_the_openapi_document_allows_gets_a_server_error(http_gateway: str) -> None:
    """Valid and invalid requests for every documented route (schemathesis, from the document
    the gateway serves): each gets an answer, never a 5xx. (schemathesis's pytest plugin does not
    load under pytest 9, so its operations drive hypothesis directly.)"""
    schema = schemathesis.openapi.from_url(f"{http_gateway}/openapi.json")
    schema.config.update(base_url=http_gateway)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]  # the document is not empty
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=operation.as_strategy())
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=120)

        fuzz()
