"""A chat answer's reasoning split from its content: ``<think>reasoning</think>content``.

What DeepSeek-R1, QwQ and Qwen3 write (vLLM's deepseek_r1 and qwen3 reasoning parsers), and
Mistral's reasoning models (Magistral) with ``[THINK]`` / ``[/THINK]`` (vLLM's mistral parser;
special tokens, so the answer's text must keep special tokens for them to be seen): the
reasoning comes first, between the tags, and the answer after them. The answer is in its
reasoning from its first token when the prompt opened the block (DeepSeek-R1's template ends the
prompt with ``<think>\\n``), or once it begins with ``<think>`` (Qwen3's; leading whitespace
allowed). A prompt that closed the block already (Qwen3 with enable_thinking false writes an empty
one) leaves the answer all content. Only the first block counts: tags later in the content are
text, and an answer cut off inside its reasoning (max_tokens) is all reasoning.

Streaming keeps back text that may be the beginning of a tag until the next delta tells:

    deltas  "<thi" "nk>\\nso 6*7</th" "ink>42"
    out     ("", "") ("\\nso 6*7", "") ("", "42")        (reasoning, content) per delta
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from scalellm.text.stop import partial_suffix


class Tags(NamedTuple):
    start: str
    end: str


THINK = Tags("<think>", "</think>")
MISTRAL = Tags("[THINK]", "[/THINK]")

PARSERS: dict[str, Tags] = {"deepseek_r1": THINK, "qwen3": THINK, "mistral": MISTRAL}
"""The reasoning parsers by their vLLM names (--reasoning-parser)."""


class Split(NamedTuple):
    reasoning: str
    content: str


class _State(enum.Enum):
    BEFORE = "before"  # nothing but whitespace yet: a start tag may come
    REASONING = "reasoning"
    CONTENT = "content"


def opens_reasoning(prompt_text: str, tags: Tags = THINK) -> bool:
    """Whether a prompt ends inside an open reasoning block (its last tag is a start tag)."""
    return prompt_text.rfind(tags.start) > prompt_text.rfind(tags.end)


class ReasoningStream:
    """Splits one answer's text deltas: feed() each, the last one with final=True."""

    __slots__ = ("_held", "_state", "_tags")

    def __init__(self, open_in_prompt: bool, tags: Tags = THINK) -> None:
        self._state = _State.REASONING if open_in_prompt else _State.BEFORE
        self._held = ""
        self._tags = tags

    def feed(self, text: str, final: bool = False) -> Split:
        """This delta's reasoning and content; final: also what was kept back (reasoning inside
        the block, content before it began)."""
        reasoning, content = self._split(self._held + text)
        if final:
            held, self._held = self._held, ""
            if self._state is _State.REASONING:
                reasoning += held
            else:
                content += held
        return Split(reasoning, content)

    def _split(self, text: str) -> Split:
        self._held = ""
        reasoning = ""
        start, end_tag = self._tags
        if self._state is _State.BEFORE:
            body = text.lstrip()
            if body.startswith(start):
                self._state, text = _State.REASONING, body[len(start) :]
            elif start.startswith(body):  # whitespace, or a start tag begun
                self._held = text
                return Split("", "")
            else:
                self._state = _State.CONTENT
        if self._state is _State.REASONING:
            end = text.find(end_tag)
            if end < 0:
                keep = partial_suffix(text, end_tag)
                self._held = text[len(text) - keep :]
                return Split(text[: len(text) - keep], "")
            reasoning, text = text[:end], text[end + len(end_tag) :]
            self._state = _State.CONTENT
        return Split(reasoning, text)


def split_reasoning(text: str, open_in_prompt: bool, tags: Tags = THINK) -> Split:
    """A whole answer split at once (the same split the stream gives)."""
    return ReasoningStream(open_in_prompt, tags).feed(text, final=True)
