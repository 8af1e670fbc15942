"""/openapi.json, /tokenize, /detokenize, /version and HTTP priority against the in-process gateway
(fixtures: test_gateway_server.py). The OpenAPI document must describe the API as served: every
route of the app is in it, each request schema lists exactly the fields its parser reads, and every
example in it is accepted by the gateway and valid under its own schema."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import jsonschema
import pytest
from openapi_spec_validator import validate

from scalellm import __version__
from services.gateway import openai_parse, responses
from services.gateway.http_app import HttpApi
from services.gateway.openai_convert import Body
from services.gateway.openapi import EXAMPLES, SCHEMAS
from tests.unit.test_gateway_server import (
    Mesh,
)


async def call(mesh: Mesh, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, mesh.http + path, json=body) as r:
        return r.status, await r.json()


async def test_the_document_is_valid_and_covers_every_route(mesh: Mesh) -> None:
    status, doc = await call(mesh, "GET", "/openapi.json")
    assert status == 200 and doc["info"]["version"] == __version__
    validate(doc)
    app = HttpApi(mesh.gateway.core).build_app()
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    documented = {(method, path) for path, item in doc["paths"].items() for method in item}
    assert routes == documented


SCHEMA_OF = {
    "/v1/completions": ("CompletionRequest", openai_parse.parse_completion, {"prompt": "x"}),
    "/v1/chat/completions": ("ChatCompletionRequest", openai_parse.parse_chat, {"messages": [{"role": "user", "content": "x"}]}),
    "/v1/responses": ("ResponsesRequest", responses.chat_body, {"input": "x"}),
    "/tokenize": ("TokenizeRequest", openai_parse.parse_tokenize, {"messages": [{"role": "user", "content": "x"}]}),
    "/detokenize": ("DetokenizeRequest", openai_parse.parse_detokenize, {"tokens": [1]}),
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(SCHEMA_OF))
def test_each_request_schema_lists_exactly_the_fields_the_parser_reads(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, parse, minimal = SCHEMA_OF[path]
    read: set[str] = set()
    finish = Body.finish

    def record(self: Body) -> None:
        if not self.prefix:
            read.update(self._seen)
        finish(self)

    monkeypatch.setattr(Body, "finish", record)
    parse(minimal)
    if path == "/tokenize":  # the prompt form reads what the messages form does not
        parse({"prompt": "x"})
    assert read == set(SCHEMAS[name]["properties"])


def _validator(name: str) -> Callable[[Any], None]:
    root = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": SCHEMAS}}
    return jsonschema.Draft202012Validator(root).validate


async def test_every_example_is_valid_and_accepted(mesh: Mesh) -> None:
    for path, examples in EXAMPLES.items():
        check = _validator(SCHEMA_OF[path][0])
        for name, body in examples.items():
            check(body)
            async with aiohttp.ClientSession() as session, session.post(mesh.http + path, json=body) as r:
                assert r.status == 200, (path, name, await r.text())
                await r.read()
    # and the schemas do refuse what the server refuses: an unknown field, a bad type
    for bad in ({"prompt": "x", "max_tokenz": 1}, {"prompt": "x", "priority": "high"}):
        with pytest.raises(jsonschema.ValidationError):
            _validator("CompletionRequest")(bad)


async def test_tokenize_and_detokenize(mesh: Mesh) -> None:
    tok = mesh.gateway.core.model.tokenizer
    status, out = await call(
        mesh, "POST", "/tokenize", {"model": "SmolLM2-135M-Instruct", "prompt": "Hello world"}
    )
    assert status == 200 and out["tokens"] == tok.encode("Hello world") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == mesh.gateway.core.model.limits.max_total_tokens and "token_strs" not in out
    messages = [{"role": "user", "content": "hi"}]
    status, chat = await call(mesh, "POST", "/tokenize", {"messages": messages, "return_token_strs": True})
    assert status == 200 and chat["token_strs"] == [tok.id_to_token(t) for t in chat["tokens"]]
    # exactly the ids a chat completion sends the worker
    await mesh.client().chat.completions.create(model="", messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert chat["tokens"] == list(mesh.workers[0].requests[-1].prompt_token_ids)
    status, text = await call(mesh, "POST", "/detokenize", {"tokens": chat["tokens"]})
    assert status == 200 and text["prompt"].endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    status, version = await call(mesh, "GET", "/version")
    assert (status, version) == (200, {"version": __version__})


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": False}, "add_special_tokens"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]}, "chat_template_kwargs"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": 0}, "add_generation_prompt"),
        ("/tokenize", {"prompt": "x", "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"prompt": "x", "bogus": 1}, "bogus"),
        ("/tokenize", {"prompt": "word " * 9000}, None),
        ("/detokenize", {"tokens": "12"}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, "tokens"),
        ("/detokenize", {"tokens": [1], "model": "other"}, "model"),
    ],
)  # fmt: skip
async def test_bad_tokenize_bodies_are_400_naming_the_field(
    mesh: Mesh, path: str, body: dict[str, Any], param: str | None
) -> None:
    status, error = await call(mesh, "POST", path, body)
    if param == "model":
        assert status == 404 and error["error"]["param"] == "model"
        return
    if param is None:  # longer than the context: tokenize still answers, with the count
        assert status == 200 and error["count"] > error["max_model_len"]
        return
    assert status == 400 and error["error"]["param"] == param, error


async def test_chat_rendering_options_shape_the_prompt_the_worker_gets(mesh: Mesh) -> None:
    """vLLM's continue_final_message (the model continues the last message), add_generation_prompt
    and chat_template_kwargs reach the chat template; /tokenize gives the ids the worker got."""
    tok = mesh.gateway.core.model.tokenizer
    messages = [{"role": "user", "content": "Name three colors."}, {"role": "assistant", "content": "Red, "}]
    cases = [
        ({"continue_final_message": True, "add_generation_prompt": False}, "<|im_start|>assistant\nRed, "),
        ({"add_generation_prompt": False}, "<|im_start|>assistant\nRed, <|im_end|>\n"),
        # a variable this template does not read changes nothing
        ({"chat_template_kwargs": {"enable_thinking": False}}, "Red, <|im_end|>\n<|im_start|>assistant\n"),
    ]
    for options, ending in cases:
        await mesh.client().chat.completions.create(
            model="", messages=messages, max_tokens=1, extra_body=options
        )  # type: ignore[arg-type]
        sent = list(mesh.workers[0].requests[-1].prompt_token_ids)
        text = tok.decode(sent, skip_special_tokens=False)
        assert text.endswith(ending), (options, text[-40:])
        status, out = await call(mesh, "POST", "/tokenize", {"messages": messages, **options})
        assert status == 200 and out["tokens"] == sent, options


async def test_priority_reaches_the_worker(mesh: Mesh) -> None:
    await mesh.client().completions.create(model="", prompt="x", max_tokens=1, extra_body={"priority": -5})
    assert mesh.workers[0].requests[-1].priority == -5
    await mesh.client().chat.completions.create(
        model="", messages=[{"role": "user", "content": "x"}], max_tokens=1, extra_body={"priority": 3}
    )
    assert mesh.workers[0].requests[-1].priority == 3
