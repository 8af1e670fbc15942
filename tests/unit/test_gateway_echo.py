"""echo and prompt logprobs on /v1/completions through the in-process gateway (fixtures and the
scripted worker: test_gateway_server.py; the worker reports each prompt token t with logprob -0.5
and t + 1 as its top alternative at -0.125)."""

from __future__ import annotations

import json

import aiohttp

from services.gateway.openai_format import parse_events
from tests.unit.test_gateway_server import (
    REPLY,
    Mesh,
)

PROMPT = "The café is"


def texts(mesh: Mesh, ids: list[int]) -> list[str]:
    return [mesh.gateway.core.model.token_text(t) for t in ids]


async def test_echo_puts_the_prompt_before_the_text(mesh: Mesh) -> None:
    out = await mesh.client().completions.create(
        model="", prompt=[PROMPT, "Hi"], echo=True, n=2, max_tokens=3
    )
    reply = "Hello! The"
    assert [c.text for c in out.choices] == [PROMPT + reply] * 2 + ["Hi" + reply] * 2
    assert out.usage is not None and out.usage.completion_tokens == 4 * 3
    assert not mesh.workers[0].requests[0].sampling.HasField("prompt_logprobs")  # no logprobs asked


async def test_echo_with_max_tokens_0_scores_the_prompt(mesh: Mesh) -> None:
    out = await mesh.client().completions.create(model="", prompt=PROMPT, echo=True, max_tokens=0, logprobs=1)
    sent = mesh.workers[0].requests[0]
    ids = list(sent.prompt_token_ids)
    assert sent.sampling.max_tokens == 1 and sent.sampling.prompt_logprobs == 1
    choice = out.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp is not None and lp.tokens == texts(mesh, ids)
    assert lp.token_logprobs == [None] + [-0.5] * (len(ids) - 1)
    assert lp.top_logprobs == [None] + [{t: -0.125} for t in texts(mesh, [i + 1 for i in ids[1:]])]
    assert lp.text_offset is not None and lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


async def test_echo_with_logprobs_streams_prompt_then_output(mesh: Mesh) -> None:
    stream = await mesh.client().completions.create(
        model="", prompt=PROMPT, echo=True, max_tokens=4, logprobs=0, stream=True
    )
    chunks = [c async for c in stream if c.choices]
    assert chunks[0].choices[0].text.startswith(PROMPT)
    text = "".join(c.choices[0].text for c in chunks)
    tokens = [
        t for c in chunks for t in (c.choices[0].logprobs.tokens or [] if c.choices[0].logprobs else [])
    ]
    offsets = [
        o for c in chunks for o in (c.choices[0].logprobs.text_offset or [] if c.choices[0].logprobs else [])
    ]
    ids = list(mesh.workers[0].requests[0].prompt_token_ids)
    assert text == PROMPT + "Hello! The café"
    assert tokens == texts(mesh, ids) + texts(mesh, mesh.reply_ids[:4])
    assert offsets[len(ids)] == len(PROMPT)  # the output's offsets continue after the echoed prompt


async def test_prompt_logprobs_in_vllms_shape(mesh: Mesh) -> None:
    out = await mesh.client().completions.create(
        model="", prompt=PROMPT, max_tokens=2, extra_body={"prompt_logprobs": 1}
    )
    ids = list(mesh.workers[0].requests[0].prompt_token_ids)
    got = (out.choices[0].model_extra or {})["prompt_logprobs"]
    assert out.choices[0].text == "Hello!" and got[0] is None and len(got) == len(ids)
    for t, entry in zip(ids[1:], got[1:], strict=True):
        assert entry == {
            str(t): {"logprob": -0.5, "rank": None, "decoded_token": texts(mesh, [t])[0]},
            str(t + 1): {"logprob": -0.125, "rank": 1, "decoded_token": texts(mesh, [t + 1])[0]},
        }
    stream = await mesh.client().completions.create(
        model="", prompt=PROMPT, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}
    )
    chunks = [c async for c in stream]
    firsts = [(c.choices[0].model_extra or {}).get("prompt_logprobs") for c in chunks]
    assert firsts[0] is not None and len(firsts[0]) == len(ids) and firsts[1:] == [None] * (len(chunks) - 1)
    assert "".join(c.choices[0].text for c in chunks) == REPLY[:6]


# ---- vLLM's chat echo, request ids and token ids in logprobs -------------------------------------

BEGUN = [{"role": "user", "content": "Greet me"}, {"role": "assistant", "content": "Sure: "}]


async def test_chat_echo_puts_the_assistants_last_message_first(mesh: Mesh) -> None:
    """vLLM's chat echo: an answer continuing the assistant's message starts with that message,
    whole and streamed; after a user's message echo adds nothing."""
    extra = {"echo": True, "continue_final_message": True, "add_generation_prompt": False}
    whole = await mesh.client().chat.completions.create(model="", messages=BEGUN, extra_body=extra)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == "Sure: " + REPLY
    assert whole.usage is not None and whole.usage.completion_tokens == len(mesh.reply_ids) + 1
    stream = await mesh.client().chat.completions.create(
        model="",
        messages=BEGUN,  # type: ignore[arg-type]
        stream=True,
        extra_body=extra,
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content.startswith("Sure: ")  # type: ignore[union-attr]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Sure: " + REPLY
    plain = await mesh.client().chat.completions.create(
        model="",
        messages=BEGUN[:1],
        extra_body={"echo": True},  # type: ignore[arg-type]
    )
    assert plain.choices[0].message.content == REPLY


async def test_a_clients_request_id_is_the_answers_id(mesh: Mesh) -> None:
    """vLLM's request_id (and the X-Request-Id header, which wins) become the answer's id and the
    X-Request-Id answered; the workers see it with a suffix, so a reused id never collides."""
    url = mesh.http + "/v1/chat/completions"
    body = {"model": "", "messages": BEGUN[:1], "max_tokens": 2, "request_id": "trace-7"}
    async with aiohttp.ClientSession() as session:
        for headers, want in (({}, "trace-7"), ({"X-Request-Id": "edge-abc.1"}, "edge-abc.1")):
            for stream in (False, True):
                async with session.post(url, json={**body, "stream": stream}, headers=headers) as r:
                    assert r.status == 200 and r.headers["X-Request-Id"] == want
                    raw = await r.read()
                first = parse_events(raw)[0] if stream else json.loads(raw)
                assert first["id"] == f"chatcmpl-{want}"
        async with session.post(url, json=body, headers={"X-Request-Id": "no spaces please"}) as r:
            error = (await r.json())["error"]
            assert r.status == 400 and error["param"] == "X-Request-Id", error
        async with session.post(mesh.http + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
            assert r.status == 200 and len(r.headers["X-Request-Id"]) == 32  # the gateway's own
    sent = [req.request_id for worker in mesh.workers for req in worker.requests]
    assert len(set(sent)) == len(sent) == 5
    assert sum(rid.startswith("trace-7-") for rid in sent) == 2
    assert sum(rid.startswith("edge-abc.1-") for rid in sent) == 2


async def test_return_tokens_as_token_ids_names_tokens_by_id(mesh: Mesh) -> None:
    out = await mesh.client().completions.create(
        model="", prompt=PROMPT, max_tokens=3, logprobs=1, extra_body={"return_tokens_as_token_ids": True}
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens == [f"token_id:{t}" for t in mesh.reply_ids[:3]]
    assert out.choices[0].text == "Hello! The"  # the text itself is unchanged
    chat = await mesh.client().chat.completions.create(
        model="",
        messages=BEGUN[:1],  # type: ignore[arg-type]
        max_tokens=2,
        logprobs=True,
        top_logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [c.token for c in content] == [f"token_id:{t}" for t in mesh.reply_ids[:2]]
    assert content[0].bytes == list(f"token_id:{mesh.reply_ids[0]}".encode())
    assert content[0].top_logprobs[0].token.startswith("token_id:")
