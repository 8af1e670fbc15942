"""Text in and out of the model, torch-free: tokenizer, chat templates, streaming detokenization, stops.

Built on ``tokenizers`` and ``jinja2`` only, so the gateway can tokenize, render chat templates,
detokenize incrementally and apply stop strings without importing torch or transformers.
"""

from __future__ import annotations

from scalellm.text.bad_words import bad_words_token_ids, resolve_bad_words
from scalellm.text.chat_template import ChatTemplateError, render_chat_template
from scalellm.text.detokenizer import IncrementalDetokenizer
from scalellm.text.stop import StopStringMatcher
from scalellm.text.tokenizer import Tokenizer

__all__ = [
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "bad_words_token_ids",
    "render_chat_template",
    "resolve_bad_words",
]
