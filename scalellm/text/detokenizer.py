"""Incremental detokenization: token ids in, text deltas out, never a broken character.

Decoding a growing sequence token by token cannot simply decode each new token alone: a multi-byte
character may be split over several tokens (byte-level BPE, or ``<0xXX>`` byte-fallback tokens), and
some decoders treat the first token of a decode specially (the SentencePiece leading space). So, as in
vLLM and TGI, each step decodes a small window twice: ``tokens[prefix_offset:read_offset]`` (text already
emitted) and ``tokens[prefix_offset:]``; the delta is what the second adds to the first. Whatever the
decoder does to the window's first token it does to both, so it cancels out. A delta is held back while
the window's text ends with U+FFFD (an incomplete character), and, for byte-fallback models, while the
last token is a byte token (those decode as a group and a later byte can still change the group).

The concatenated deltas plus :meth:`IncrementalDetokenizer.flush` equal ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from collections.abc import Iterable

from scalellm.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as context when ``prompt_ids`` is given (enough for any decoder's look-behind).
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas for one sequence.

    ``prompt_ids``: optional tokens already shown (e.g. the prompt); their last few give context for
    the first generated tokens (a SentencePiece ``▁Paris`` after a prompt then yields `` Paris``, as it
    does in the full text) and are never emitted themselves. Without them the deltas add up to
    ``decode(fed ids)``.
    """

    __slots__ = (
        "_byte_ids",
        "_context_len",
        "_emitted",
        "_prefix_offset",
        "_read_offset",
        "_tokenizer",
        "_tokens",
        "skip_special_tokens",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prompt_ids: Iterable[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._byte_ids = tokenizer.byte_fallback_ids
        context = list(prompt_ids)[-_CONTEXT_TOKENS:]
        # Never start the window inside a byte-fallback group of the prompt.
        while context and context[0] in self._byte_ids:
            context.pop(0)
        self._tokens: list[int] = context
        self._context_len = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._emitted: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """The ids fed so far (without prompt context)."""
        return self._tokens[self._context_len :]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._tokens[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed one id or several; return the text they complete (possibly ``""``)."""
        if isinstance(token_ids, int):
            self._tokens.append(token_ids)
        else:
            self._tokens.extend(token_ids)
        if len(self._tokens) == self._read_offset:
            return ""
        if self._tokens[-1] in self._byte_ids:
            return ""  # a byte-fallback group may still grow: wait for it to close
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of the stream: whatever was held back (an incomplete character shows as U+FFFD)."""
        if len(self._tokens) == self._read_offset:
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""  # nothing new yet, or an incomplete character at the end
        # A decoder that is not local would break the window's prefix: then use the exact full decode.
        delta = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else self._full_delta()
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        if delta:
            self._emitted.append(delta)
        return delta

    def _full_delta(self) -> str:
        if self._context_len:
            context = self._decode(0, self._context_len)
            full = self._decode(0)
            full = full[len(context) :] if full.startswith(context) else self._decode(self._context_len)
        else:
            full = self._decode(0)
        done = self.text
        return full[len(done) :] if full.startswith(done) else ""
