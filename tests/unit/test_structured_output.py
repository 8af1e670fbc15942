"""Structured output and sampling controls through the real engine on CPU (a tiny random Llama with
the demo tokenizer): what comes out keeps every constraint, whatever the random weights prefer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from scalellm import LLM
from scalellm.types import InvalidParameter, SamplingParams, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
PROMPT = "Describe a user as JSON."


@pytest.fixture(scope="module")
def llm(tiny_chat_model: Path) -> LLM:
    return LLM(model=str(tiny_chat_model), dtype="float32", num_kv_blocks=300)


def _texts(llm: LLM, params: list[SamplingParams]) -> list[tuple[str, str | None]]:
    outs = llm.generate([PROMPT] * len(params), params)
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


def test_json_schema_output_parses_and_validates(llm: LLM) -> None:
    so = StructuredOutput.json_schema(SCHEMA)
    params = [SamplingParams(temperature=0.0, max_tokens=80, structured_output=so)]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=80, structured_output=so) for s in range(4)]
    for text, finish in _texts(llm, params):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish == "stop", text


CHOICES = ['say "hi"', "a|b", "café", "no"]
POLITE = r"(yes|no) (please|thanks)"


@pytest.mark.parametrize(
    ("constraint", "pattern"),
    [
        (StructuredOutput.regex(r"[a-z]{2,5}-[0-9]{2}"), r"[a-z]{2,5}-[0-9]{2}"),
        (StructuredOutput.lark('start: ("yes" | "no") " " ("please" | "thanks")'), POLITE),
        # GBNF (vLLM's grammar examples): read as GBNF once Lark refuses it
        (StructuredOutput.lark('root ::= answer " " polite\nanswer ::= "yes" | "no"\npolite ::= "please" | "thanks"'), POLITE),
        # a choice (vLLM's guided_choice) is one of its strings exactly, quotes and bars included
        (StructuredOutput.choice(CHOICES), "|".join(re.escape(c) for c in CHOICES)),
    ],
    ids=["regex", "lark", "gbnf", "choice"],
)  # fmt: skip
def test_grammar_outputs_match(llm: LLM, constraint: StructuredOutput, pattern: str) -> None:
    params = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=30, structured_output=constraint) for s in range(4)
    ]
    for text, finish in _texts(llm, params):
        assert re.fullmatch(pattern, text) and finish == "stop", text


def test_json_object_output_is_an_object_and_bias_cannot_break_the_grammar(llm: LLM) -> None:
    """'"' and '}' pushed by +100 wherever the grammar allows them, so the random model's
    free-running keys end; the grammar still decides where they may go: the output is an object."""
    biased = [llm.tokenizer.encode(c, add_special_tokens=False) for c in ('"', "}")]
    assert all(len(ids) == 1 for ids in biased)
    params = [
        SamplingParams(
            temperature=1.0, seed=seed, max_tokens=40, logit_bias={ids[0]: 100.0 for ids in biased},
            structured_output=StructuredOutput.json_object(),
        )
        for seed in range(3)
    ]  # fmt: skip
    for text, finish in _texts(llm, params):
        assert isinstance(json.loads(text), dict) and finish == "stop", text


def test_logit_bias_min_tokens_and_bans_in_the_engine(llm: LLM) -> None:
    eos = min(llm.engine.eos_token_ids)
    plain = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    greedy = plain[0].outputs[0].token_ids
    forced = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, logit_bias={777: 100.0})
    held = SamplingParams(temperature=0.0, max_tokens=20, min_tokens=4, logit_bias={eos: 100.0})
    banned = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, bad_words_token_ids=[(t,) for t in set(greedy)]
    )
    outs = llm.generate([PROMPT] * 3, [forced, held, banned])
    assert outs[0].outputs[0].token_ids == [777] * 6
    held_ids = outs[1].outputs[0].token_ids
    assert held_ids[:4] == [t for t in held_ids[:4] if t not in llm.engine.eos_token_ids]
    assert held_ids[4:] == [eos] and outs[1].outputs[0].finish_reason == "stop"
    assert not set(outs[2].outputs[0].token_ids) & set(greedy)
    assert len(outs[2].outputs[0].token_ids) == 12


def test_bad_words_as_text_are_never_generated(llm: LLM) -> None:
    plain = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    first = plain[0].outputs[0].token_ids[0]
    word = llm.tokenizer.decode([first]).strip()
    assert llm.tokenizer.encode(word, add_special_tokens=False) == [first]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, bad_words=[word])
    out = llm.generate([PROMPT], params)[0].outputs[0]
    assert first not in out.token_ids and len(out.token_ids) == 12


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(structured_output=StructuredOutput.regex("(unclosed")), "structured_output"),
        (
            SamplingParams(structured_output=StructuredOutput.lark("start: undefined_rule")),
            "structured_output",
        ),
        (SamplingParams(structured_output=StructuredOutput.lark("root ::= undefined")), "structured_output"),
        (SamplingParams(structured_output=StructuredOutput.lark("root ::= ( unclosed")), "structured_output"),
        (SamplingParams(logit_bias={10**7: 1.0}), "logit_bias"),
        (SamplingParams(bad_words_token_ids=[(1, 10**7)]), "bad_words_token_ids"),
        (SamplingParams(bad_words=["x"]), "bad_words"),
    ],
)
def test_what_the_engine_cannot_honour_names_its_field(llm: LLM, params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        llm.engine.make_request("bad", [1, 2, 3], params)
    assert err.value.field == field, err.value
