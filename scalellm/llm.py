"""Offline generation, shaped like vLLM's ``LLM`` so its users feel at home.

from scalellm import LLM, SamplingParams
llm = LLM(model="/path/to/hf-folder")
for out in llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=32)):
    print(out.outputs[0].text)
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypedDict

from tqdm import tqdm

from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.request import Request
from scalellm.models.prepare import resolve_model_dir
from scalellm.text import Tokenizer, resolve_bad_words
from scalellm.text.detokenizer import IncrementalDetokenizer
from scalellm.text.stop import StopStringMatcher
from scalellm.types import FinishReason, SamplingParams, TokenLogprobs


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


PromptType = str | TokensPrompt


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    """A str enum: compares equal to "stop", "length", "abort"."""
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With SamplingParams.prompt_logprobs: one entry per prompt token, the first None (as vLLM)."""

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """An engine plus a tokenizer. Keyword arguments go to :class:`EngineConfig`
    (``tensor_parallel_size=N`` splits the model over N processes: close() stops them)."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        model_dir = resolve_model_dir(model)
        self.engine = LLMEngine(EngineConfig(model=str(model_dir), **engine_kwargs))
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (vLLM's accessor; also ``llm.tokenizer``)."""
        return self.tokenizer

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks (``tensor_parallel_size`` > 1); idempotent.
        Also on leaving a ``with LLM(...) as llm:`` block."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in the order of the prompts, each with
        ``n`` choices (choice k of a seeded request samples with seed + k, as in vLLM)."""
        prompt_list = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        params_list = _broadcast(sampling_params or SamplingParams(), len(prompt_list))
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        if len(priorities) != len(prompt_list):
            raise ValueError("priority must have one entry per prompt")

        # Validate everything before queueing anything, so a bad prompt leaves the engine clean.
        prompts_out: list[tuple[str | None, list[_Choice]]] = []
        for prompt, params, prio in zip(prompt_list, params_list, priorities, strict=True):
            text, ids = self._tokenize(prompt)
            params = resolve_bad_words(self.tokenizer, params)
            choices = [self._choice(ids, params, k, prio) for k in range(params.n)]
            prompts_out.append((text, choices))
        by_id = {c.request.request_id: c for _, choices in prompts_out for c in choices}
        for choice in by_id.values():
            self.engine.add(choice.request)

        bar = tqdm(total=len(prompts_out), desc="generate", disable=not use_tqdm)
        pending = set(by_id)
        while pending:
            events = self.engine.step()
            for event in events:
                choice = by_id[event.request_id]
                if event.token_id is not None and choice.stops is not None:
                    self._match_stop(choice, event.token_id)
                if event.finished:  # a stop-string match's abort reports in the next step
                    pending.discard(event.request_id)
            if not events and not self.engine.has_unfinished():
                raise RuntimeError(f"the engine finished without reporting {sorted(pending)}")
            bar.update(sum(1 for _, cs in prompts_out if all(c.done(pending) for c in cs)) - bar.n)
        bar.close()
        return [self._output(text, choices) for text, choices in prompts_out]

    def _choice(self, ids: list[int], params: SamplingParams, k: int, priority: int) -> _Choice:
        """One engine request per choice: stop strings stay here (the engine knows tokens only)."""
        seed = params.seed if params.seed is None or k == 0 else (params.seed + k) % 2**63
        engine_params = replace(params, n=1, stop=(), seed=seed)
        req = self.engine.make_request(str(next(self._ids)), ids, engine_params, priority)
        stops = None
        if params.stop:
            stops = _StopWatch(
                StopStringMatcher(params.stop, include_stop=params.include_stop_str_in_output),
                IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, prompt_ids=ids),
            )
        return _Choice(k, req, stops)

    def _match_stop(self, choice: _Choice, token_id: int) -> None:
        """Feed one token's text to the choice's stop strings; on a match, end the request here."""
        assert choice.stops is not None
        safe, matched = choice.stops.matcher.add(choice.stops.detokenizer.add(token_id))
        choice.stops.text += safe
        if matched is not None and not choice.stop_matched:
            choice.stop_matched = True
            self.engine.abort_request(choice.request.request_id)  # None if this was its last token

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Conversations through the model's chat template, as vLLM's ``LLM.chat``: one
        conversation (a list of messages) or several (a list of them); one output each.
        continue_final_message (with add_generation_prompt=False): the model continues the last
        message instead of answering it; chat_template_kwargs: extra variables for the template."""
        batch = bool(messages) and not isinstance(messages[0], Mapping)
        conversations = list(messages) if batch else [messages]
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(
                list(conversation),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            prompts.append({"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, list(prompt["prompt_token_ids"])
        raise ValueError("each prompt must be a string or {'prompt_token_ids': [...]}")

    def _output(self, prompt: str | None, choices: list[_Choice]) -> RequestOutput:
        first = choices[0].request
        return RequestOutput(
            first.request_id,
            prompt,
            first.prompt_token_ids,
            [self._completion(c) for c in choices],
            first.num_cached_tokens,
            [None, *first.prompt_logprobs] if first.sampling_params.prompt_logprobs is not None else None,
        )

    def _completion(self, choice: _Choice) -> CompletionOutput:
        req = choice.request
        params = req.sampling_params
        ids = list(req.output_token_ids)
        reason: FinishReason | None
        if choice.stop_matched and choice.stops is not None:
            text, reason = choice.stops.text, FinishReason.STOP
        else:
            reason = req.status.finish_reason
            shown = params.shown_ids(ids, reason is FinishReason.STOP, self.engine.eos_token_ids)
            # decoded after the prompt's last tokens, as the gateway streams it (and vLLM decodes):
            # a SentencePiece word keeps its space, a byte that continues the prompt's stays with it
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, req.prompt_token_ids)
            text = detok.add(shown) + detok.flush()
        return CompletionOutput(
            index=choice.index,
            text=text,
            token_ids=ids,
            finish_reason=reason,
            logprobs=list(req.logprobs) if params.logprobs is not None else None,
        )


@dataclass
class _StopWatch:
    """A choice's text so far, cut where a stop string ends it."""

    matcher: StopStringMatcher
    detokenizer: IncrementalDetokenizer
    text: str = ""


@dataclass
class _Choice:
    index: int
    request: Request
    stops: _StopWatch | None
    stop_matched: bool = False

    def done(self, pending: set[str]) -> bool:
        return self.request.request_id not in pending


def _broadcast(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params


def run_generate_command(args: argparse.Namespace) -> int:
    """`scalellm generate`: print each prompt's completion."""
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )
    for prompt in args.prompts:
        if args.chat:
            out = llm.chat([{"role": "user", "content": prompt}], params)[0]
        else:
            out = llm.generate(prompt, params)[0]
        print(out.outputs[0].text)
    return 0
