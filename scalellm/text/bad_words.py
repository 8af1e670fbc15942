"""Bad words as text -> the token sequences the engine bans (SamplingParams.bad_words_token_ids).

A word may be tokenized differently at the start of the text and after a space, so each word gives
both its own tokens and those of " " + word (as vLLM does); the engine bans the last token of a
sequence whenever the output ends with the rest of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from scalellm.text.tokenizer import Tokenizer
from scalellm.types import SamplingParams


def bad_words_token_ids(tokenizer: Tokenizer, words: Iterable[str]) -> tuple[tuple[int, ...], ...]:
    out: dict[tuple[int, ...], None] = {}
    for word in words:
        bare = word.lstrip()
        for text in (bare, " " + bare):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                out[ids] = None
    return tuple(out)


def resolve_bad_words(tokenizer: Tokenizer, params: SamplingParams) -> SamplingParams:
    """``params`` with its text bad_words moved into bad_words_token_ids (what the engine takes)."""
    if not params.bad_words:
        return params
    ids = params.bad_words_token_ids + bad_words_token_ids(tokenizer, params.bad_words)
    return replace(params, bad_words=(), bad_words_token_ids=ids)
