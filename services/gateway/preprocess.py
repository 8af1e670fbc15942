"""Preprocessor: a GenerationSpec to a GenerationRequest (tokenize, apply limits, mint the id).

Every check here runs before any worker is touched. Long texts are tokenized off the event loop.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from scalellm.text import ChatTemplateError
from services.gateway.config import GatewayConfig
from services.gateway.errors import ErrorKind, GatewayError, invalid
from services.gateway.model import ServedModel
from services.gateway.request import GenerationRequest, GenerationSpec, Prompt, PromptKind

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
            messages = [{"role": m.role, "content": m.content, "name": m.name} for m in prompt.messages]
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True)
            except (ChatTemplateError, ValueError) as exc:
                raise invalid(
                    f"'{prompt.param}': the chat template refused the conversation: {exc}", prompt.param
                ) from exc
            return (tuple(await self._encode(text, add_special_tokens=False)),)
        return tuple([tuple(await self._encode(text, add_special_tokens=True)) for text in prompt.texts])

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
        return GenerationRequest(
            request_id=uuid.uuid4().hex,
            model=self.model.name,
            prompts=prompts,
            sampling=replace(spec.sampling, max_tokens=max_tokens),
            priority=spec.priority,
            tenant=tenant,
            received_at=received_at,
        )
