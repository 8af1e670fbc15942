"""scalellm/text/reasoning.py: a chat answer's <think> block split from its content, whole and
over every way of cutting the text into deltas."""

from __future__ import annotations

import random

import pytest

from scalellm.text.reasoning import MISTRAL, THINK, ReasoningStream, Tags, opens_reasoning, split_reasoning

CASES = [
    # (answer, the prompt opened the block, (reasoning, content))
    ("<think>\nso 6*7</think>42", False, ("\nso 6*7", "42")),
    ("  <think>x</think>\n\nAnswer <think>y</think>", False, ("x", "\n\nAnswer <think>y</think>")),
    ("plain answer", False, ("", "plain answer")),
    ("plain <think> later", False, ("", "plain <think> later")),
    ("reasoning only</think>answer", True, ("reasoning only", "answer")),
    ("cut off in its reasoning </thi", True, ("cut off in its reasoning </thi", "")),
    ("<thin", False, ("", "<thin")),
    ("   ", False, ("", "   ")),
    ("", False, ("", "")),
    ("<think></think>", False, ("", "")),
    ("<think>a < b and </ c</think>", False, ("a < b and </ c", "")),
]


def _as_mistral(text: str) -> str:
    return text.replace("<think>", "[THINK]").replace("</think>", "[/THINK]").replace("</thi", "[/THI")


@pytest.mark.parametrize("tags", [THINK, MISTRAL], ids=["think", "mistral"])
@pytest.mark.parametrize(("answer", "opened", "want"), CASES)
def test_whole_and_every_cut_into_deltas_agree(
    answer: str, opened: bool, want: tuple[str, str], tags: Tags
) -> None:
    if tags is MISTRAL:  # the same cases with Magistral's tags
        answer, want = _as_mistral(answer), (_as_mistral(want[0]), _as_mistral(want[1]))
    assert tuple(split_reasoning(answer, opened, tags)) == want
    rng = random.Random(answer)
    for _ in range(300):
        cuts = sorted(rng.sample(range(len(answer) + 1), min(len(answer) + 1, rng.randint(0, 8))))
        deltas = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)], strict=True)]
        stream = ReasoningStream(opened, tags)
        parts = [stream.feed(d, final=i == len(deltas) - 1) for i, d in enumerate(deltas)]
        assert ("".join(p.reasoning for p in parts), "".join(p.content for p in parts)) == want, deltas


def test_text_that_may_begin_a_tag_waits_for_the_next_delta() -> None:
    stream = ReasoningStream(open_in_prompt=False)
    assert [tuple(stream.feed(d)) for d in ("<thi", "nk>\nso 6*7</th", "ink>42")] == [
        ("", ""),
        ("\nso 6*7", ""),
        ("", "42"),
    ]


def test_the_prompts_last_tag_says_whether_the_answer_starts_inside_the_block() -> None:
    assert opens_reasoning("<|User|>hi<|Assistant|><think>\n")  # DeepSeek-R1's template
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking off
    assert not opens_reasoning("<|im_start|>assistant\n")
    assert opens_reasoning("[INST]hi[/INST][THINK]", MISTRAL) and not opens_reasoning(
        "[INST]hi[/INST][THINK]"
    )
