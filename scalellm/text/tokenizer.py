"""A torch-free tokenizer over a Hugging Face model folder (``tokenizers`` + ``jinja2`` only).

It reads ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja`` (and
``additional_chat_templates/``) and ``generation_config.json``, and behaves like transformers'
``AutoTokenizer`` (5.x, fast tokenizers) on the same folder for what serving needs: ``encode``,
``decode``, ``apply_chat_template`` and the special token ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _HFTokenizer

from scalellm.text.chat_template import render_chat_template

__all__ = ["Tokenizer"]

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


class Tokenizer:
    """Tokenize, detokenize and render chat templates for one model folder."""

    def __init__(
        self,
        backend: _HFTokenizer,
        config: Mapping[str, Any] | None = None,
        *,
        chat_templates: Mapping[str, str] | None = None,
        generation_eos_ids: Iterable[int] = (),
        name: str = "",
    ) -> None:
        config = dict(config or {})
        self._tok = backend
        self.name = name
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            content = _token_content(config.get(key))
            if content is not None:
                self.special_tokens[key] = content

        # Named special tokens missing from the vocabulary are added as special tokens (as transformers does).
        missing = [t for t in self.special_tokens.values() if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
            )

        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        if "add_bos_token" in config or "add_eos_token" in config or self._tok.post_processor is None:
            self._update_post_processor()

        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self._generation_eos_ids = _ids(list(generation_eos_ids))

        self._special_ids = frozenset(
            idx for idx, tok in self._tok.get_added_tokens_decoder().items() if tok.special
        )
        self._byte_fallback_ids = self._find_byte_fallback_ids()

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face model folder (``tokenizer.json`` is required)."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        backend = _HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")

        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            templates.update({t["name"]: t["template"] for t in raw if "name" in t and "template" in t})
        # Template files win over tokenizer_config.json, as in transformers.
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                templates[file.stem] = file.read_text(encoding="utf-8")

        model_config = _read_json(path / "config.json")
        generation_config = _read_json(path / "generation_config.json")
        eos_ids = _ids(generation_config.get("eos_token_id", model_config.get("eos_token_id")))

        # Without named bos/eos tokens in tokenizer_config.json, fall back to the model's ids.
        for key, cfg_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
            if _token_content(config.get(key)) is None:
                ids = _ids(model_config.get(cfg_key)) or _ids(generation_config.get(cfg_key))
                if ids and backend.id_to_token(ids[0]) is not None:
                    config[key] = backend.id_to_token(ids[0])

        return cls(backend, config, chat_templates=templates, generation_eos_ids=eos_ids, name=str(path))

    def _update_post_processor(self) -> None:
        # The tokens to add (None: not added, or the tokenizer has none).
        bos = self.special_tokens.get("bos_token") if self.add_bos_token else None
        eos = self.special_tokens.get("eos_token") if self.add_eos_token else None
        single = (
            f"{(bos + ':0 ') if bos is not None else ''}$A:0{(' ' + eos + ':0') if eos is not None else ''}"
        )
        pair = f"{single}{(' ' + bos + ':1') if bos is not None else ''} $B:1{(' ' + eos + ':1') if eos is not None else ''}"
        special = []
        if bos is not None:
            special.append((bos, self._tok.token_to_id(bos)))
        if eos is not None:
            special.append((eos, self._tok.token_to_id(eos)))
        self._tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=special
        )

    def _find_byte_fallback_ids(self) -> frozenset[int]:
        if not getattr(self._tok.model, "byte_fallback", False):
            return frozenset()
        return frozenset(
            idx for tok, idx in self._tok.get_vocab(with_added_tokens=False).items() if _BYTE_TOKEN.match(tok)
        )

    # -- ids -------------------------------------------------------------------------------------------

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the tokenizer's EOS, then generation_config.json's eos ids."""
        ids = [self.eos_token_id, *self._generation_eos_ids]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (what ``skip_special_tokens`` drops)."""
        return self._special_ids

    @property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of ``<0xXX>`` byte tokens when the model uses byte fallback (Llama 2, Mistral), else empty."""
        return self._byte_fallback_ids

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    # -- text ------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text are matched, as in transformers)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Several texts at once (the Rust side runs them in parallel)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. No space clean-up (transformers skips it for BPE)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def get_chat_template(self, name: str | None = None, tools: Sequence[Any] | None = None) -> str:
        """The template to use: ``name`` if given, else ``tool_use`` when tools are passed, else the default."""
        if name is not None:
            if name in self.chat_templates:
                return self.chat_templates[name]
            if "{" in name:  # a template given inline
                return name
            raise ValueError(f"no chat template named {name!r} (have {sorted(self.chat_templates)})")
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        raise ValueError(f"the tokenizer of {self.name or 'this model'} has no chat template")

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text, as transformers' ``apply_chat_template(tokenize=False)``.

        ``messages`` are dicts with ``role`` and ``content`` (or objects with those attributes, dataclasses,
        pydantic models). Extra keyword arguments reach the template as variables.
        """
        template = self.get_chat_template(chat_template, tools)
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            special_tokens=self.special_tokens,
            **kwargs,
        )

    def encode_chat(
        self, messages: Sequence[Any], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered conversation (the template writes the special tokens itself)."""
        return self.encode(
            self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"
