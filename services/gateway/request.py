"""What a request is to the gateway, what it yields, and how it fails.

    GenerationSpec     what a front end parsed: prompt(s) and the shared SamplingParams
    GenerationRequest  tokenized, limits checked, max_tokens resolved: ready for the workers
    ChoiceUpdate       new output of one choice; the last one with finish reason, usage, timings
    GatewayError       any failure reported to a client: its ErrorKind fixes the HTTP status,
                       the OpenAI error type and the gRPC status code, for both front ends

How to generate (n and stop strings included), finish reason, usage and timings are the shared
types of scalellm.types.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from scalellm.text.tool_calls import Tool, ToolCall
from scalellm.types import FinishReason, SamplingParams, Timings, TokenLogprobs, Usage

# Roles the chat template is given; "developer" is OpenAI's newer name for "system".
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


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
    tool_calls: tuple[ToolCall, ...] = ()
    """An assistant's calls earlier in the conversation."""
    tool_call_id: str | None = None
    """A tool message: the call it answers."""
    reasoning: str | None = None
    """An assistant's reasoning, as a reasoning parser returned it (reasoning_content)."""

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' keys; unset ones left out)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [call.to_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


# Names the gateway gives the chat template itself: chat_template_kwargs may not set them.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template",
     "special_tokens", "template", "tokenize"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ChatRendering:
    """How a conversation becomes the prompt's text (vLLM's chat request extensions).

    With continue_final_message the last message is left open and the model continues it (the
    beginning of an answer written by the client): no generation prompt, and the rendering stops
    right after that message's text.
    """

    add_generation_prompt: bool = True
    """Open the assistant's turn after the conversation."""
    continue_final_message: bool = False
    """Leave the last message open for the model to continue."""
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template (e.g. enable_thinking); JSON values."""

    def __post_init__(self) -> None:
        if self.continue_final_message and self.add_generation_prompt:
            raise invalid(
                "'continue_final_message' leaves the last message open and 'add_generation_prompt' "
                "starts a new turn: set 'add_generation_prompt' to false to continue the last message",
                "continue_final_message",
            )
        for name in self.template_kwargs:
            if name in RESERVED_TEMPLATE_VARIABLES:
                raise invalid(
                    f"'chat_template_kwargs' cannot set {name!r}: the gateway decides it",
                    "chat_template_kwargs",
                )


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
    tools: tuple[Tool, ...] = ()
    """Functions shown to the chat template (a conversation's ``tools``)."""
    rendering: ChatRendering = ChatRendering()
    """How a conversation is rendered."""

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
    truncate_prompt_tokens: int | None = None
    """vLLM's: keep only each prompt's last k tokens (-1: as many as the limit allows)."""
    param_names: Mapping[str, str] = field(default_factory=dict)
    """The client's name for a SamplingParams field where it is not the field's own (HTTP:
    structured_output -> response_format or guided_regex ...; gRPC: sampling.<field>): errors
    found after parsing (the workers', the vocabulary checks) name the field as the client did."""
    request_id: str | None = None
    """The client's id for it (vLLM's request_id, or the X-Request-Id header): the answer's id,
    and the start of the id the workers see (which adds a random suffix: clients reuse ids)."""


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
    tenant_weight: float = 1.0
    received_at: float = 0.0  # time.perf_counter() when the request arrived
    param_names: Mapping[str, str] = field(default_factory=dict)
    """GenerationSpec.param_names."""

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.sampling.n

    def prompt_of(self, choice: int) -> tuple[int, ...]:
        return self.prompts[choice // self.sampling.n]

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens as OpenAI counts them: each prompt once, whatever n is."""
        return sum(len(p) for p in self.prompts)

    @property
    def budget_tokens(self) -> int:
        """The most tokens it may use (a tenant's tpm counts this): prompt tokens + max_tokens
        for every choice."""
        return self.prompt_tokens + (self.sampling.max_tokens or 0) * self.num_choices


@dataclass(slots=True)
class ChoiceUpdate:
    """New output of one choice: one per decode message, the last with finish, usage and timings."""

    index: int
    token_ids: Sequence[int]
    text: str
    logprobs: Sequence[TokenLogprobs] = ()
    finish: FinishReason | None = None
    stop_str: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    prompt_logprobs: Sequence[TokenLogprobs] = ()
    """With the choice's first token, when asked for: those of prompt tokens 1.."""


# ---- errors --------------------------------------------------------------------------------------


class ErrorKind(enum.Enum):
    """(HTTP status, OpenAI error type, gRPC status code) of a kind of failure."""

    INVALID = (400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT)
    UNAUTHENTICATED = (401, "authentication_error", grpc.StatusCode.UNAUTHENTICATED)
    NOT_FOUND = (404, "not_found_error", grpc.StatusCode.NOT_FOUND)
    METHOD_NOT_ALLOWED = (405, "invalid_request_error", grpc.StatusCode.UNIMPLEMENTED)
    TOO_LARGE = (413, "invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED)
    OVERLOADED = (429, "rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED)
    INTERNAL = (500, "server_error", grpc.StatusCode.INTERNAL)
    UNAVAILABLE = (503, "service_unavailable", grpc.StatusCode.UNAVAILABLE)
    TIMEOUT = (504, "timeout_error", grpc.StatusCode.DEADLINE_EXCEEDED)

    @property
    def http_status(self) -> int:
        return self.value[0]

    @property
    def openai_type(self) -> str:
        return self.value[1]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[2]


class GatewayError(Exception):
    """A failure to report to the client: a kind, a message, and the offending parameter if any."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        """Seconds a client should wait before retrying (HTTP Retry-After, gRPC retry-after)."""

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.kind.openai_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"GatewayError({self.kind.name}, {self.message!r}, param={self.param!r})"


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    """A 400 / INVALID_ARGUMENT naming the offending parameter."""
    return GatewayError(ErrorKind.INVALID, message, param=param, code=code)


def client_named(error: GatewayError, names: Mapping[str, str]) -> GatewayError:
    """The error with its param (a SamplingParams field) under the client's name for it, in the
    param and in the message ('structured_output' -> 'guided_regex', 'logit_bias' ->
    'sampling.logit_bias')."""
    param = error.param
    if param is None or param not in names:
        return error
    name = names[param]
    message = error.message.replace(f"'{param}'", f"'{name}'", 1)
    return GatewayError(error.kind, message, param=name, code=error.code, retry_after=error.retry_after)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def checked_request_id(value: str, name: str) -> str:
    """A client's request id (vLLM's request_id, an X-Request-Id header or gRPC metadata): 1-128
    letters, digits or ``._:@/+=-`` (it goes into ids, headers and logs as it is); a 400 /
    INVALID_ARGUMENT naming ``name`` otherwise."""
    if _REQUEST_ID.fullmatch(value) is None:
        why = f"'{name}' must be 1-128 letters, digits or ._:@/+=- characters, got {value[:40]!r}"
        raise invalid(why, name, "invalid_value")
    return value


_RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


class WorkerFailure(Exception):
    """One request failed on a decode worker: the status the worker sent for it, or the one that
    stands for what befell it on the gateway's side (its Session stream broke: UNAVAILABLE; its
    deadline passed: DEADLINE_EXCEEDED; the gateway cancelled it: CANCELLED).

    SessionCall.read() raises it; streaming retries it elsewhere while nothing was sent (retryable)
    or turns it into the GatewayError the client gets (to_gateway_error), which each front end
    then reports as an HTTP status or a gRPC status.
    """

    def __init__(self, status: grpc.StatusCode, details: str, param: str | None = None) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details
        self.param = param
        """INVALID_ARGUMENT for a bad sampling value: the SamplingParams field at fault."""

    @property
    def retryable(self) -> bool:
        """No KV room (RESOURCE_EXHAUSTED) or draining, gone (UNAVAILABLE): another worker may
        take the request."""
        return self.status in _RETRYABLE

    def to_gateway_error(self, worker_id: str, names: Mapping[str, str] | None = None) -> GatewayError:
        """The failure as the gateway reports it to its client (``names``: the client's name of
        each SamplingParams field, GenerationRequest.param_names)."""
        status = self.status
        detail = f"decode worker {worker_id}: {status.name}: {self.details}"
        if status is grpc.StatusCode.INVALID_ARGUMENT:
            error = GatewayError(ErrorKind.INVALID, self.details or detail, param=self.param)
            return error if self.param is None else client_named(error, names or {})
        if status is grpc.StatusCode.DEADLINE_EXCEEDED:
            return GatewayError(ErrorKind.TIMEOUT, "the request ran past its deadline", code="timeout")
        if status is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return GatewayError(ErrorKind.OVERLOADED, f"no decode worker has KV room ({detail})")
        if status is grpc.StatusCode.UNAVAILABLE:
            return GatewayError(ErrorKind.UNAVAILABLE, detail)
        return GatewayError(ErrorKind.INTERNAL, detail)
