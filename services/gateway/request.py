"""The gateway's typed requests: what the HTTP and gRPC front ends parse into, before and after
tokenization. Front ends build a GenerationSpec; Preprocessor turns it into a GenerationRequest.
How to generate is the shared SamplingParams (scalellm.types), n and stop strings included."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from scalellm.types import SamplingParams


class PromptKind(enum.Enum):
    """How the client gave the prompt."""

    TEXT = "text"
    TOKENS = "tokens"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation (roles are checked by the front end)."""

    role: str
    content: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Prompt:
    """One or more prompts (completions accept a batch) or one conversation.

    param names the request field, for error messages ("prompt", "messages", "text"...).
    """

    kind: PromptKind
    param: str
    texts: tuple[str, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] = ()
    messages: tuple[ChatMessage, ...] = ()

    @property
    def count(self) -> int:
        """How many prompts (a conversation is one)."""
        if self.kind is PromptKind.TEXT:
            return len(self.texts)
        if self.kind is PromptKind.TOKENS:
            return len(self.token_ids)
        return 1


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationSpec:
    """A validated request before tokenization."""

    model: str | None
    prompt: Prompt
    sampling: SamplingParams
    """max_tokens None: the default below, within the limits."""
    priority: int = 0
    default_max_tokens: int | None = None  # None: up to the max total tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """A request ready for the workers: tokenized, limits checked, max_tokens resolved.

    Choice i runs prompt i // n (n = sampling.n); there are len(prompts) * n choices.
    """

    request_id: str
    model: str
    prompts: tuple[tuple[int, ...], ...]
    sampling: SamplingParams
    priority: int = 0
    tenant: str = ""
    received_at: float = 0.0  # time.perf_counter() when the request arrived

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.sampling.n

    def prompt_of(self, choice: int) -> tuple[int, ...]:
        return self.prompts[choice // self.sampling.n]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens as OpenAI counts them: each prompt once, whatever n is."""
        return sum(len(p) for p in self.prompts)
