"""Structured output through llguidance: compile a constraint once per spec, track each request's
place in it, and mask the logits of a batch with one bitmask.

    StructuredOutput ──compile (cached, off the step thread)──> Grammar ──matcher()──> GrammarMatcher
        per step: fill_bitmask([matchers]) -> int32 [R, ceil(V/32)] -> apply_bitmask(logits rows)
        per token: Request.append_token -> matcher.accept(token)

Why llguidance (bench/grammar_engines.py, docs/benchmarks.md): no compile step to wait for (a new
schema costs ~1 ms, against ~25 ms for xgrammar and ~300 ms for outlines-core), a step's mask
costs tens of microseconds per request, and it needs nothing but its own wheel (xgrammar pulls
transformers and triton and takes seconds to import). A matcher lives on its Request, so a request
continued on a decode worker rebuilds its state by accepting the prefill worker's first token.

Bit ``b`` of word ``w`` of a row allows token ``32 * w + b``:

    word w:  [bit31 ... bit1 bit0]  ->  tokens 32w+31 ... 32w+1 32w
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import llguidance
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

from scalellm.types import InvalidParameter, StructuredKind, StructuredOutput

log = logging.getLogger(__name__)

FIELD = "structured_output"
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
"""Compact JSON (no free whitespace): small models otherwise wander into endless blank space."""


@dataclass(frozen=True)
class Grammar:
    """A constraint compiled and checked for one vocabulary; cheap to start matchers from."""

    tokenizer: llguidance.LLTokenizer
    text: str

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(llguidance.LLMatcher(self.tokenizer, self.text, log_level=0))


class GrammarMatcher:
    """One request's place in its grammar (mutable: advanced by every token it accepts)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def accept(self, token_id: int) -> None:
        """Advance by a generated token. A token the grammar refuses (only possible when other
        controls banned every token it allowed) leaves the matcher failed, which ends the request."""
        if not self._m.consume_token(token_id) and not self._m.is_stopped():
            log.warning("structured output refused token %d: %s", token_id, self._m.get_error())

    @property
    def done(self) -> bool:
        """Nothing but the end may follow (the output is complete), or the matcher failed."""
        return self._m.is_stopped() or self._m.is_error()

    @property
    def raw(self) -> llguidance.LLMatcher:
        return self._m


class GrammarCompiler:
    """Compiles constraints for the model's vocabulary; thread-safe, cached by spec (LRU).

    The llguidance tokenizer is built from the model folder's tokenizer.json on first use (about
    half a second), so engines that never see structured output never pay for it."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: Iterable[int], cache_size: int = 256):
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[StructuredOutput, Grammar] = OrderedDict()

    def compile(self, spec: StructuredOutput) -> Grammar:
        """The grammar for ``spec``; InvalidParameter when llguidance refuses it."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        tokenizer = self._llg_tokenizer()
        text = _grammar_text(spec)
        error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
        if error and spec.kind is StructuredKind.LARK and "::=" in spec.spec:  # GBNF's rules
            gbnf, gbnf_error = _from_gbnf(spec.spec, tokenizer)  # Lark first: Lark is never converted
            text, error = (gbnf, "") if gbnf else (text, f"{error}\nnor as GBNF: {gbnf_error}")
        if error:
            raise InvalidParameter(FIELD, f"cannot be compiled: {error}")
        grammar = Grammar(tokenizer, text)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                path = self.model_dir / "tokenizer.json"
                if not path.is_file():
                    raise InvalidParameter(FIELD, f"is not available: the model has no {path.name}")
                self._tokenizer = llguidance.LLTokenizer(
                    path.read_text(encoding="utf-8"), n_vocab=self.vocab_size, eos_token=self.eos_token_ids
                )
            return self._tokenizer


def _grammar_text(spec: StructuredOutput) -> str:
    try:
        if spec.kind is StructuredKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps({"type": "object"}), defaults=_JSON_OPTIONS
            )
        if spec.kind is StructuredKind.JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, defaults=_JSON_OPTIONS)
        if spec.kind is StructuredKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(spec.spec)
        return llguidance.LLMatcher.grammar_from_lark(spec.spec)
    except ValueError as exc:
        raise InvalidParameter(FIELD, f"cannot be compiled: {exc}") from None


def _from_gbnf(grammar: str, tokenizer: llguidance.LLTokenizer) -> tuple[str, str]:
    """A grammar Lark refused read as GBNF (llguidance's converter): (grammar, "") or ("", why not)."""
    try:
        text = llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(grammar))
    except Exception as exc:  # the converter raises whatever its parser meets
        return "", str(exc) or type(exc).__name__
    error = llguidance.LLMatcher.validate_grammar(text, tokenizer)
    return ("", error) if error else (text, "")


class BitmaskFiller:
    """Fills the next-token bitmasks of a batch's matchers into one tensor and unpacks it.

    One matcher after another: llguidance's thread-pool executor cost ~100 ms a call on a busy
    2-core machine against microseconds for the plain calls (llguidance caches each state's mask)."""

    def __init__(self) -> None:
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self, matchers: list[GrammarMatcher], vocab_size: int) -> torch.Tensor:
        """bool [len(matchers), vocab_size] on the CPU: the tokens each matcher allows next."""
        words = (vocab_size + 31) // 32
        bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
        row_bytes = words * bitmask.element_size()
        for i, m in enumerate(matchers):
            m.raw.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), row_bytes)
        bits = (bitmask.unsqueeze(-1) >> self._shifts) & 1
        return bits.view(len(matchers), words * 32)[:, :vocab_size].bool()
