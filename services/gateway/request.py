"""The gateway's typed requests: what the HTTP and gRPC front ends parse into, before and after
tokenization. Front ends build a GenerationSpec; Preprocessor turns it into a GenerationRequest."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from scalellm.v1 import common_pb2


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
class Sampling:
    """Sampling parameters as the workers take them (max_tokens None: fill in from the limits)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def to_proto(self) -> common_pb2.SamplingParams:
        """The wire message (built once per request, shared by its sequences)."""
        msg = common_pb2.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_tokens=self.max_tokens or 0,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
        )
        if self.seed is not None:
            msg.seed = self.seed
        if self.logprobs is not None:
            msg.logprobs = self.logprobs
        return msg


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationSpec:
    """A validated request before tokenization."""

    model: str | None
    prompt: Prompt
    sampling: Sampling
    n: int = 1
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    default_max_tokens: int | None = None  # None: up to the max total tokens


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationRequest:
    """A request ready for the workers: tokenized, limits checked, max_tokens resolved.

    Choice i runs prompt i // n; there are len(prompts) * n choices.
    """

    request_id: str
    model: str
    prompts: tuple[tuple[int, ...], ...]
    sampling: Sampling
    n: int = 1
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    tenant: str = ""
    received_at: float = 0.0  # time.perf_counter() when the request arrived

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def prompt_of(self, choice: int) -> tuple[int, ...]:
        return self.prompts[choice // self.n]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens as OpenAI counts them: each prompt once, whatever n is."""
        return sum(len(p) for p in self.prompts)
