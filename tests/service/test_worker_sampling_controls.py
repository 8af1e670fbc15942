"""Sampling controls and structured output on real worker processes: a disaggregated pair (the
prefill worker samples the first token, the decode worker the rest, drafting greedy requests'
tokens by prompt lookup) gives exactly what a colocated worker and the engine alone give,
penalties and grammars included."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest

from scalellm.types import SamplingParams, StructuredOutput
from scalellm.types.proto import sampling_to_proto
from scalellm.v1 import worker_pb2
from tests.procs import Service, start_service
from tests.service.worker_calls import generate, wait_all_blocks_free, worker_args

pytestmark = pytest.mark.slow

PREFILL_ID = "prefill-controls"
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "label": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "label", "ok"],
    "additionalProperties": False,
}
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12] * 5 + [300, 301, 302]
ALLOWED = (400, 401, 402, 403, 404)


def _cases(first: int) -> dict[str, tuple[list[int], SamplingParams]]:
    """(prompt, params) per case. ``first`` is the greedy first token after PROMPT; the first
    four cases each change it (asserted below), so a prefill worker that dropped a control on
    the first token would give itself away; the others run the controls over a whole output."""
    so = StructuredOutput.json_schema(SCHEMA)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return {
        "ban": (PROMPT, replace(greedy, bad_words_token_ids=((first,),))),
        "bias": (PROMPT, replace(greedy, logit_bias=((400, 3.0),))),
        # the model repeats `first`; the prompt already has it twice: the penalty reaches it
        "repetition": ([*PROMPT, first, first], replace(greedy, repetition_penalty=1.8)),
        "allowed": (PROMPT, replace(greedy, allowed_token_ids=ALLOWED)),
        "plain": (PROMPT, replace(greedy, max_tokens=24)),  # drafts on the decode worker
        "penalties": (PROMPT, replace(greedy, max_tokens=16, presence_penalty=1.2, frequency_penalty=0.6)),
        "seeded": (PROMPT, SamplingParams(
            temperature=1.0, seed=11, max_tokens=16, ignore_eos=True, presence_penalty=-0.5,
            repetition_penalty=1.3, logit_bias={401: 2.5},
        )),
        "min_tokens": (PROMPT, SamplingParams(temperature=0.0, max_tokens=10, min_tokens=3, logit_bias={2: 100.0})),
        "json_greedy": (PROMPT, SamplingParams(temperature=0.0, max_tokens=60, structured_output=so)),
        "json_sampled": (PROMPT, SamplingParams(
            temperature=1.0, seed=3, max_tokens=60, repetition_penalty=1.2, structured_output=so
        )),
        "regex": (PROMPT, SamplingParams(
            temperature=1.0, seed=4, max_tokens=20, structured_output=StructuredOutput.regex(r"[a-z]{3}-[0-9]{2}")
        )),
    }  # fmt: skip


@pytest.fixture(scope="module")
def services(tiny_chat_model: Path) -> Iterator[tuple[Service, Service, Service]]:
    prefill = start_service("services.prefill", worker_args(tiny_chat_model, "--worker-id", PREFILL_ID))
    speculative = ("--num-speculative-tokens", "4", "--speculative-max-rows", "64")
    decode = start_service("services.decode", worker_args(tiny_chat_model, "--role", "decode", *speculative))
    colocated = start_service("services.decode", worker_args(tiny_chat_model, "--role", "both"))
    yield prefill, decode, colocated
    for svc in (colocated, decode, prefill):
        assert svc.stop() == 0, svc.log()


async def test_disaggregated_equals_colocated_equals_the_engine(
    tiny_chat_model: Path, services: tuple[Service, Service, Service]
) -> None:
    from scalellm import LLM

    prefill, decode, colocated = services
    llm = LLM(model=str(tiny_chat_model), dtype="float32", num_kv_blocks=200)

    def alone(prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [o.outputs[0].token_ids for o in outs]

    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    [[first]] = alone([PROMPT], [greedy])
    cases = _cases(first)
    expected = dict(
        zip(cases, alone([p for p, _ in cases.values()], [s for _, s in cases.values()]), strict=True)
    )
    [[repeated]] = alone([cases["repetition"][0]], [greedy])
    assert repeated == first  # without the penalty the model would repeat itself
    assert first not in ALLOWED
    for name in ("ban", "bias", "repetition", "allowed"):
        assert expected[name][0] != first, name
    assert set(expected["allowed"]) <= set(ALLOWED) and len(expected["allowed"]) == 8

    target = [worker_pb2.PrefillTarget(worker_id=PREFILL_ID, address=prefill.address)]
    results = {}
    for mesh, address, targets in (("disagg", decode.address, target), ("colocated", colocated.address, [])):
        reqs = [
            worker_pb2.GenerateRequest(
                request_id=f"{mesh}-{name}",
                prompt_token_ids=prompt,
                sampling=sampling_to_proto(p),
                prefill=targets,
            )
            for name, (prompt, p) in cases.items()
        ]
        outs = await generate(address, reqs)
        results[mesh] = {name: tokens for name, (tokens, _) in zip(cases, outs, strict=True)}
        if targets:
            assert all(last.timings.transfer_bytes > 0 for _, last in outs)  # the prefill worker ran them
    assert results["disagg"] == expected
    assert results["colocated"] == expected

    assert 2 not in expected["min_tokens"][:3] and expected["min_tokens"][3:] == [2]
    port = decode.proc.args[decode.proc.args.index("--metrics-port") + 1]  # type: ignore[union-attr]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    accepted = re.search(r"^scalellm_spec_decode_accepted_tokens_total (\S+)$", metrics, re.M)
    assert accepted and float(accepted[1]) > 0, "the decode worker verified no drafts"
    for name in ("json_greedy", "json_sampled"):
        jsonschema.validate(json.loads(llm.tokenizer.decode(expected[name])), SCHEMA)
    await wait_all_blocks_free(decode)
    await wait_all_blocks_free(colocated)


async def test_a_spec_or_id_the_engine_cannot_honour_is_invalid_argument(
    services: tuple[Service, Service, Service],
) -> None:
    prefill, decode, colocated = services
    target = [worker_pb2.PrefillTarget(worker_id=PREFILL_ID, address=prefill.address)]
    bad = [
        SamplingParams(structured_output=StructuredOutput.regex("(unclosed")),
        SamplingParams(logit_bias={10**6: 1.0}),
    ]
    for address, targets in ((decode.address, target), (colocated.address, [])):
        for i, params in enumerate(bad):
            req = worker_pb2.GenerateRequest(
                request_id=f"bad-{i}",
                prompt_token_ids=PROMPT,
                sampling=sampling_to_proto(params),
                prefill=targets,
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(address, [req])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details() is not None and (
                "structured_output" in err.value.details() or "logit_bias" in err.value.details()
            )
    await wait_all_blocks_free(decode)


async def test_through_the_gateway_disaggregated(
    tiny_chat_model: Path, services: tuple[Service, Service, Service]
) -> None:
    """The gateway's OpenAI fields reach a disaggregated pair: logit_bias banning the first token
    (sampled by the prefill worker) equals the engine alone, response_format json_schema validates."""
    from scalellm import LLM
    from services.gateway.config import GatewayConfig
    from services.gateway.prefix import RoutingMode
    from services.gateway.server import GatewayServer

    prefill, decode, _ = services
    llm = LLM(model=str(tiny_chat_model), dtype="float32", num_kv_blocks=200)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    [first] = (
        llm.generate([{"prompt_token_ids": PROMPT}], replace(greedy, max_tokens=1))[0].outputs[0].token_ids
    )
    want = llm.generate([{"prompt_token_ids": PROMPT}], replace(greedy, logit_bias={first: -100.0}))[
        0
    ].outputs[0]
    assert want.token_ids[0] != first
    config = GatewayConfig(
        host="127.0.0.1", http_port=0, grpc_port=0, model=str(tiny_chat_model),
        decode_addrs=(decode.address,), prefill_addrs=(f"{PREFILL_ID}={prefill.address}",),
        routing=RoutingMode.LOAD,  # the prefill worker runs every prompt, short ones too
    )  # fmt: skip
    server = GatewayServer(config)
    await server.start()
    url = f"http://127.0.0.1:{server.http_port}/v1"
    try:
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0) as client:
            out = await client.completions.create(
                model=tiny_chat_model.name, prompt=PROMPT, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True, "logit_bias": {str(first): -100}},
                extra_headers={"x-scalellm-timings": "1"},
            )  # fmt: skip
            assert out.choices[0].text == want.text
            assert (out.choices[0].model_extra or {})["timings"][
                "transfer_bytes"
            ] > 0  # the prefill worker ran it
            chat = await client.chat.completions.create(
                model=tiny_chat_model.name, messages=[{"role": "user", "content": "An item?"}], max_tokens=60,
                temperature=1.0, seed=7, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},  # type: ignore[arg-type]
            )  # fmt: skip
            assert chat.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(chat.choices[0].message.content or ""), SCHEMA)
    finally:
        await server.stop(0)
    await wait_all_blocks_free(decode)
