"""The offline API, shaped like vLLM's: LLM(model=...).generate(prompts, sampling_params)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scalellm import LLM, SamplingParams

pytestmark = pytest.mark.slow  # every test runs the demo model


@pytest.fixture(scope="module")
def llm(demo_model_dir: Path) -> LLM:
    # float32, as wherever outputs are compared (test_gateway_e2e): in bfloat16 the demo model's
    # first answer token is a tie ("The" and "L" both 25.125 after the lm_head's bfloat16 output
    # rounding, 0.08 apart in float32), so which side it falls on is luck of the rounding
    return LLM(model=str(demo_model_dir), dtype="float32", num_kv_blocks=512, max_model_len=1024)


def test_generate_strings_and_token_prompts(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    ids = llm.tokenizer.encode("The capital of France is")
    by_text, by_ids = llm.generate(["The capital of France is", {"prompt_token_ids": ids}], greedy)
    assert by_text.prompt == "The capital of France is" and by_ids.prompt is None
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids == ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.outputs[0].text == llm.tokenizer.decode(by_text.outputs[0].token_ids)
    assert "Paris" in by_text.outputs[0].text
    assert by_text.outputs[0].finish_reason in ("stop", "length")


def test_one_sampling_params_per_prompt(llm: LLM) -> None:
    outs = llm.generate(
        ["Hello", "Hello"],
        [SamplingParams(temperature=0.0, max_tokens=3), SamplingParams(temperature=0.0, max_tokens=7)],
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 7]
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]


def test_chat_stops_at_end_of_turn(llm: LLM) -> None:
    [out] = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=64),
    )
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert "<|im_end|>" not in out.outputs[0].text
    # several conversations at once, as vLLM's LLM.chat takes them: one output each, in order
    other = [{"role": "user", "content": "What is the capital of Italy?"}]
    both = llm.chat([[{"role": "user", "content": "What is the capital of France?"}], other],
                    SamplingParams(temperature=0.0, max_tokens=64))  # fmt: skip
    [alone] = llm.chat(other, SamplingParams(temperature=0.0, max_tokens=64))
    assert [o.outputs[0].text for o in both] == [out.outputs[0].text, alone.outputs[0].text]
    assert both[1].prompt_token_ids == alone.prompt_token_ids != out.prompt_token_ids
    assert alone.prompt_token_ids == llm.get_tokenizer().encode_chat(other)


def test_the_token_that_stopped_the_output_is_not_in_its_text(llm: LLM) -> None:
    """As in vLLM: an EOS kept by skip_special_tokens=False, or an ordinary token given in
    stop_token_ids, ends the output and stays in its token ids, but not in its text (unless
    include_stop_str_in_output)."""
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = SamplingParams(temperature=0.0, max_tokens=64, skip_special_tokens=False)
    [out] = llm.chat(ask, greedy)
    ids = out.outputs[0].token_ids
    assert out.outputs[0].finish_reason == "stop" and ids[-1] in llm.engine.eos_token_ids
    assert out.outputs[0].text == llm.tokenizer.decode(ids[:-1], skip_special_tokens=False)
    [kept] = llm.chat(ask, replace(greedy, include_stop_str_in_output=True))
    assert kept.outputs[0].text == llm.tokenizer.decode(ids, skip_special_tokens=False)
    k = next(i for i in range(1, len(ids) - 1) if ids[i] not in ids[:i])
    [cut] = llm.chat(ask, replace(greedy, stop_token_ids=(ids[k],)))
    assert cut.outputs[0].token_ids == ids[: k + 1] and cut.outputs[0].finish_reason == "stop"
    assert cut.outputs[0].text == llm.tokenizer.decode(ids[:k])


def test_chat_continues_a_final_assistant_message(llm: LLM) -> None:
    """continue_final_message: the model goes on from the answer's beginning it was given, as it
    does from the same rendering sent as a prompt."""
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    [out] = llm.chat(messages, greedy, add_generation_prompt=False, continue_final_message=True)
    text = llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert text.endswith("<|im_start|>assistant\nThe capital of France is")
    assert out.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)
    assert "Paris" in out.outputs[0].text and not out.outputs[0].text.startswith("The capital")


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=20)
    a = llm.generate("Once upon a time", params)[0].outputs[0].token_ids
    b = llm.generate(["Tell me a joke.", "Once upon a time"], params)[1].outputs[0].token_ids
    c = llm.generate("Once upon a time", SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=20))
    assert a == b
    assert c[0].outputs[0].token_ids != a


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("1, 2, 3,", SamplingParams(temperature=0.0, max_tokens=4, logprobs=2))[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0.0 and lp.top[0][0] == tok  # greedy: the top token


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ({"prompt_token_ids": [1, 2, 49152]}, "prompt_token_ids"),
        ({"prompt_token_ids": [-1]}, "prompt_token_ids"),
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt_token_ids": [5] * 1024}, "prompt_token_ids has 1024 tokens; the context length is 1024"),
        ({"text": "hi"}, "prompt"),
    ],
)
def test_bad_prompts_raise_clear_errors_and_leave_the_engine_clean(
    llm: LLM, prompt: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine", prompt], SamplingParams(max_tokens=2))  # type: ignore[list-item]
    assert not llm.engine.has_unfinished()
    assert llm.engine.num_free_blocks == llm.engine.blocks.num_blocks


def test_max_tokens_is_capped_by_the_context(llm: LLM) -> None:
    out = llm.generate(
        {"prompt_token_ids": [5] * 1020}, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 4 and out[0].outputs[0].finish_reason == "length"


def test_stop_strings_cut_the_text_and_end_the_request(llm: LLM) -> None:
    prompt, greedy = (
        "The capital of France is",
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    )
    full = llm.generate(prompt, greedy)[0].outputs[0]
    words = full.text.split()
    stop = words[len(words) // 2]  # a word in the middle of what the model says
    cut = full.text.index(stop)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))
    kept = llm.generate(
        prompt,
        SamplingParams(
            temperature=0.0, max_tokens=24, ignore_eos=True, stop=stop, include_stop_str_in_output=True
        ),
    )
    for choice, text in (
        (out[0].outputs[0], full.text[:cut]),
        (kept[0].outputs[0], full.text[: cut + len(stop)]),
    ):
        assert choice.text == text and choice.finish_reason == "stop"
        ids = choice.token_ids  # generation ended at the token that completed the stop string
        assert ids == full.token_ids[: len(ids)] and len(ids) < len(full.token_ids)
        assert stop in llm.tokenizer.decode(ids) and stop not in llm.tokenizer.decode(ids[:-1])
    stats = llm.engine.stats()
    assert not llm.engine.has_unfinished() and stats.num_running == stats.num_waiting == 0


def test_n_choices_sample_with_seed_plus_k(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    (out,) = llm.generate("Once upon a time", params)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    one = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    # The same batch of three, as three prompts seeded 7, 8, 9 (the same batch, so the same numerics)
    alone = llm.generate(["Once upon a time"] * 3, [replace(one, seed=7 + k) for k in range(3)])
    assert [c.token_ids for c in out.outputs] == [a.outputs[0].token_ids for a in alone]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
