"""Admission: the API keys, the served model with its token limits, and the Preprocessor that
turns a parsed request into a worker-ready one (tokenize, check the limits, mint the id). Every
check here runs before any worker is touched.

API keys: a file of keys mapped to tenants, checked on every route but /health. File format, one
key per line: ``KEY TENANT [key=value ...]`` (whitespace between; TENANT defaults to "default";
the optional fields are the tenant's weight and limits, tenants.py). Blank lines and lines
starting with ``#`` are skipped. The file is refused when users other than its owner (and
group) can read it, like any secret file (scalellm/security/files.py).

Keys are kept only as SHA-256 digests, in a dict from digest to tenant. Is the lookup constant
time? Not literally: the dict hashes the digest and compares it with the entries in one bucket,
and how long that takes depends on the digest. But the digest is of the *presented* key, and what
the timing could reveal is how a stored digest relates to it (a shared prefix, a bucket). Turning
that into a key would need a SHA-256 preimage, so the timing tells an attacker nothing they can
use, whatever they send; and the process never holds a key in clear. A lookup costs one SHA-256
and one dict probe (about a microsecond) however many keys there are, where comparing with
``hmac.compare_digest`` against every stored key would grow with their number.

A refusal says why (``AuthFailure``: missing, malformed, unknown), which the gateway counts in
/metrics; neither the key nor its digest is ever logged or counted.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from tokenizers import decoders

from scalellm.models.config import ModelConfig
from scalellm.security import check_private
from scalellm.text import ChatTemplateError, Tokenizer, resolve_bad_words
from scalellm.text.reasoning import PARSERS as REASONING_TAGS
from scalellm.text.reasoning import ReasoningStream, opens_reasoning
from scalellm.text.tool_calls import ToolFormat
from scalellm.types import InvalidParameter, SamplingParams
from services.gateway.config import GatewayConfig
from services.gateway.request import (
    ErrorKind,
    GatewayError,
    GenerationRequest,
    GenerationSpec,
    Prompt,
    PromptKind,
    client_named,
    invalid,
)
from services.gateway.tenants import ANONYMOUS, Tenant, merge_fields


class AuthFailure(enum.Enum):
    """Why a request was refused (the label of scalellm_gateway_auth_failures)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN = "unknown"


class KeyRefused(GatewayError):
    """UNAUTHENTICATED, with the reason."""

    def __init__(self, reason: AuthFailure, message: str) -> None:
        super().__init__(ErrorKind.UNAUTHENTICATED, message, code="invalid_api_key")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """Digest of each key -> its tenant (tenants.py: its weight and limits). Empty means
    authentication is off: every request is the one tenant ANONYMOUS."""

    tenants: dict[bytes, Tenant]

    @classmethod
    def disabled(cls) -> ApiKeys:
        return cls({})

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        """Read a keys file; ValueError on a malformed one or one others can read (a gateway must
        not start open by mistake)."""
        keys: dict[bytes, str] = {}
        fields: dict[str, list[list[str]]] = {}
        text = check_private(path, "API keys file").read_text(encoding="utf-8")
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) > 2 and "=" not in parts[1]:
                name, extra = parts[1], parts[2:]
            elif len(parts) == 2 and "=" not in parts[1]:
                name, extra = parts[1], []
            else:
                name, extra = "default", parts[1:]
            try:
                Tenant.parse(name, extra)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: expected 'KEY [TENANT] [key=value ...]': {exc}") from None
            keys[_digest(parts[0])] = name
            fields.setdefault(name, []).append(extra)
        if not keys:
            raise ValueError(f"{path} holds no API keys")
        try:
            tenants = {name: merge_fields(name, lines) for name, lines in fields.items()}
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return cls({digest: tenants[name] for digest, name in keys.items()})

    def lookup(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer KEY`` value; KeyRefused if none."""
        if not self.tenants:
            return ANONYMOUS
        if not authorization:
            raise KeyRefused(AuthFailure.MISSING, "missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise KeyRefused(AuthFailure.MALFORMED, "malformed Authorization header: expected 'Bearer <key>'")
        tenant = self.tenants.get(_digest(key.strip()))
        if tenant is None:
            raise KeyRefused(AuthFailure.UNKNOWN, "incorrect API key provided")
        return tenant

    def tenant(self, authorization: str | None) -> str:
        """The name of lookup()'s tenant."""
        return self.lookup(authorization).name

    def all_tenants(self) -> tuple[Tenant, ...]:
        """Every tenant of the file, once each, by name."""
        return tuple(sorted({t.name: t for t in self.tenants.values()}.values(), key=lambda t: t.name))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


# ---- the served model ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLimits:
    """Token bounds checked before any worker is touched."""

    max_prompt_tokens: int
    max_total_tokens: int

    @classmethod
    def resolve(cls, config: GatewayConfig, context_length: int) -> TokenLimits:
        """Configured limits, capped by the model's context length (0 means that length)."""
        total = min(config.max_total_tokens or context_length, context_length)
        prompt = min(config.max_prompt_tokens or total - 1, total - 1)
        if prompt < 1:
            raise ValueError(f"max_total_tokens {total} leaves no room for a prompt and one token")
        return cls(max_prompt_tokens=prompt, max_total_tokens=total)


_PROMPT_TAIL_TOKENS = 16
"""Prompt tokens read to tell whether the prompt opened a reasoning block (its last tag)."""


class ServedModel:
    """The served model: its tokenizer, public name, context length and token limits.

    The context length is the one the workers' engines take from the same config.json, through the
    same torch-free ModelConfig (a folder the workers could not load is refused here too)."""

    def __init__(self, path: Path, config: GatewayConfig, name: str | None = None) -> None:
        """name: the public name of a model added with --add-model (its workers register under
        it too); None: the default model's (--served-model-name, else the folder's name)."""
        self.path = path
        self.tokenizer = Tokenizer.from_dir(path)
        self.name = name or config.served_model_name or path.name
        model_config = ModelConfig.from_dir(path)
        self.context_length = model_config.context_length
        self.eos_token_ids = frozenset(model_config.eos_token_ids)
        """The ids that end an answer (as the workers' engines read them from the same files)."""
        self.limits = TokenLimits.resolve(config, self.context_length)
        self.created = int(time.time())
        self.reasoning_tags = REASONING_TAGS[config.reasoning_parser] if config.reasoning_parser else None
        """The tags of chat answers' reasoning block (--reasoning-parser); None: no split."""
        self.reasoning_needs_special_tokens = self.reasoning_tags is not None and any(
            self.tokenizer.token_to_id(tag) in self.tokenizer.special_token_ids for tag in self.reasoning_tags
        )
        """Whether the tags are special tokens, which a chat answer's text must then keep."""
        self.worker_model: str | None = (
            name if name else None if config.worker_model == "*" else config.worker_model or self.name
        )
        self._tool_format: ToolFormat | None = None
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)
        self._token_bytes = lru_cache(maxsize=65536)(self._bytes_of)
        self._byte_level = isinstance(self.tokenizer.backend.decoder, decoders.ByteLevel)

    def tool_format(self) -> ToolFormat:
        """How the model writes tool calls: read from the chat template it uses with tools."""
        if self._tool_format is None:
            try:
                template: str | None = self.tokenizer.get_chat_template(None, tools=[{}])  # any tool
            except ValueError:  # no chat template
                template = None
            self._tool_format = ToolFormat.for_template(template)
        return self._tool_format

    def reasoning_stream(self, prompt: Sequence[int]) -> ReasoningStream | None:
        """The splitter of a chat choice's text, None without a reasoning parser; inside the block
        from the start when the prompt (its last tokens) opened one."""
        if self.reasoning_tags is None:
            return None
        tail = self.tokenizer.decode(prompt[-_PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
        return ReasoningStream(opens_reasoning(tail, self.reasoning_tags), self.reasoning_tags)

    def accepts(self, name: str | None) -> bool:
        """True for the names a request may use: empty (the default), the served name or the folder."""
        return not name or name == self.name or name == str(self.path)

    def token_text(self, token_id: int) -> str:
        """The text of one token alone (logprobs tables); cached, special tokens kept."""
        return self._token_text(token_id)

    def token_bytes(self, token_id: int) -> tuple[int, ...]:
        """The UTF-8 bytes one token stands for (exact for byte-level BPE, even mid-character)."""
        return self._token_bytes(token_id)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes_of(self, token_id: int) -> tuple[int, ...]:
        piece = self.tokenizer.id_to_token(token_id)
        if self._byte_level and piece is not None and token_id not in self.tokenizer.special_token_ids:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return tuple(table[ch] for ch in piece)
        return tuple(self._decode_one(token_id).encode("utf-8"))


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


# ---- tokenize and check --------------------------------------------------------------------------


# Texts longer than this (characters) are tokenized on a thread, not on the event loop.
_OFFLOAD_CHARS = 8192


class Preprocessor:
    """Turns validated specs into worker-ready requests for one served model."""

    def __init__(self, model: ServedModel, config: GatewayConfig) -> None:
        self.model = model
        self.config = config

    def check_model(self, name: str | None) -> None:
        if not self.model.accepts(name):
            raise GatewayError(
                ErrorKind.NOT_FOUND,
                f"the model {name!r} does not exist (this gateway serves {self.model.name!r})",
                param="model",
                code="model_not_found",
            )

    async def tokenize(self, prompt: Prompt) -> tuple[tuple[int, ...], ...]:
        """Token ids of each prompt; the chat template is applied to conversations."""
        tok = self.model.tokenizer
        if prompt.kind is PromptKind.TOKENS:
            vocab = tok.vocab_size
            for i, ids in enumerate(prompt.token_ids):
                bad = next((t for t in ids if t >= vocab), None)
                if bad is not None:
                    raise invalid(
                        f"'{prompt.param}': token id {bad} in prompt {i} is not below the vocabulary size {vocab}",
                        prompt.param,
                    )
            return prompt.token_ids
        if prompt.kind is PromptKind.CHAT:
            messages = [m.to_template() for m in prompt.messages]
            tools = [t.to_openai() for t in prompt.tools] or None
            r = prompt.rendering
            try:
                if any(m.tool_calls or m.tool_call_id is not None for m in prompt.messages):
                    messages = self.model.tool_format().template_messages(messages)  # ids it takes
                text = tok.apply_chat_template(
                    messages,
                    add_generation_prompt=r.add_generation_prompt,
                    continue_final_message=r.continue_final_message,
                    tools=tools,
                    **r.template_kwargs,
                )
            except (ChatTemplateError, ValueError) as exc:
                raise invalid(
                    f"'{prompt.param}': the chat template refused the conversation: {exc}", prompt.param
                ) from exc
            return (tuple(await self._encode(text, add_special_tokens=False)),)
        return tuple([tuple(await self._encode(text, add_special_tokens=True)) for text in prompt.texts])

    def _truncate(self, prompts: tuple[tuple[int, ...], ...], keep: int) -> tuple[tuple[int, ...], ...]:
        """Each prompt's last ``keep`` tokens (vLLM's left truncation; -1: the prompt limit)."""
        limit = self.model.limits.max_prompt_tokens
        if keep > limit:
            raise invalid(
                f"'truncate_prompt_tokens' {keep} is more than the limit of {limit} prompt tokens",
                "truncate_prompt_tokens",
                "invalid_value",
            )
        keep = limit if keep == -1 else keep
        return tuple(p[-keep:] for p in prompts)

    def _keeps_special_tokens(self, prompt: Prompt) -> bool:
        """Whether a chat's answer is read from special tokens its text must keep: its tool calls
        (Mistral v11's tags) or its reasoning block (Magistral's [THINK])."""
        if prompt.kind is not PromptKind.CHAT:
            return False
        return self.model.reasoning_needs_special_tokens or (
            bool(prompt.tools) and self.model.tool_format().needs_special_tokens
        )

    def _worker_sampling(
        self, sampling: SamplingParams, max_tokens: int, names: Mapping[str, str]
    ) -> SamplingParams:
        """max_tokens resolved (min_tokens is checked against it again), bad words as token ids,
        and every token id within the vocabulary; GatewayError naming the field as the client
        did (``names``) otherwise."""
        tok = self.model.tokenizer
        try:
            out = resolve_bad_words(tok, replace(sampling, max_tokens=max_tokens))
            out.check_vocabulary(tok.vocab_size)
        except InvalidParameter as exc:
            raise client_named(invalid(str(exc), exc.field, "invalid_value"), names) from None
        return out

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if len(text) > _OFFLOAD_CHARS:
            return await asyncio.to_thread(self.model.tokenizer.encode, text, add_special_tokens)
        return self.model.tokenizer.encode(text, add_special_tokens)

    async def prepare(self, spec: GenerationSpec, tenant: str, received_at: float) -> GenerationRequest:
        """Tokenize, check the limits, resolve max_tokens; GatewayError naming the field otherwise."""
        self.check_model(spec.model)
        choices = spec.prompt.count * spec.sampling.n
        if choices > self.config.max_n:
            raise invalid(
                f"'n' x prompts = {choices} choices is more than the limit {self.config.max_n}", "n"
            )
        if len(spec.sampling.stop) > self.config.max_stop_strings:
            raise invalid(
                f"'stop' has {len(spec.sampling.stop)} strings, more than the limit {self.config.max_stop_strings}",
                "stop",
            )
        prompts = await self.tokenize(spec.prompt)
        limits = self.model.limits
        if spec.truncate_prompt_tokens is not None:
            prompts = self._truncate(prompts, spec.truncate_prompt_tokens)
        longest = max(len(p) for p in prompts)
        if any(not p for p in prompts):
            raise invalid(f"'{spec.prompt.param}' is empty (no tokens after tokenization)", spec.prompt.param)
        if longest > limits.max_prompt_tokens:
            raise invalid(
                f"'{spec.prompt.param}' has {longest} tokens, more than the limit of {limits.max_prompt_tokens}",
                spec.prompt.param,
                "context_length_exceeded",
            )
        room = limits.max_total_tokens - longest
        max_tokens = spec.sampling.max_tokens
        if max_tokens is None:
            max_tokens = min(spec.default_max_tokens or room, room)
        elif max_tokens > room:
            raise invalid(
                f"'max_tokens' {max_tokens} + the prompt's {longest} tokens is more than the limit "
                f"of {limits.max_total_tokens} total tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        sampling = spec.sampling
        if self._keeps_special_tokens(spec.prompt):
            sampling = replace(sampling, skip_special_tokens=False)
        return GenerationRequest(
            request_id=uuid.uuid4().hex
            if spec.request_id is None
            else f"{spec.request_id}-{uuid.uuid4().hex[:16]}",
            model=self.model.name,
            prompts=prompts,
            sampling=self._worker_sampling(sampling, max_tokens, spec.param_names),
            priority=spec.priority,
            tenant=tenant,
            received_at=received_at,
            param_names=spec.param_names,
        )
