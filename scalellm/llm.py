"""Offline generation, shaped like vLLM's ``LLM`` so its users feel at home.

from scalellm import LLM, SamplingParams
llm = LLM(model="/path/to/hf-folder")
for out in llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=32)):
    print(out.outputs[0].text)
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from tqdm import tqdm

from scalellm.engine.config import EngineConfig
from scalellm.engine.engine import LLMEngine
from scalellm.engine.request import Request
from scalellm.models.prepare import resolve_model_dir
from scalellm.text import Tokenizer
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

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """An engine plus a tokenizer. Keyword arguments go to :class:`EngineConfig`."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        model_dir = resolve_model_dir(model)
        self.engine = LLMEngine(EngineConfig(model=str(model_dir), **engine_kwargs))
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in the order of the prompts."""
        prompt_list = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        params_list = _broadcast(sampling_params or SamplingParams(), len(prompt_list))
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        if len(priorities) != len(prompt_list):
            raise ValueError("priority must have one entry per prompt")

        # Validate everything before queueing anything, so a bad prompt leaves the engine clean.
        requests: list[tuple[str | None, Request]] = []
        for prompt, params, prio in zip(prompt_list, params_list, priorities, strict=True):
            text, ids = self._tokenize(prompt)
            requests.append((text, self.engine.make_request(str(next(self._ids)), ids, params, prio)))
        for _, req in requests:
            self.engine.add(req)

        bar = tqdm(total=len(requests), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished():
            bar.update(sum(1 for e in self.engine.step() if e.finished))
        bar.close()
        return [self._output(text, req) for text, req in requests]

    def chat(
        self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None
    ) -> RequestOutput:
        """One conversation through the model's chat template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return self.generate({"prompt_token_ids": ids}, sampling_params)[0]

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, list(prompt["prompt_token_ids"])
        raise ValueError("each prompt must be a string or {'prompt_token_ids': [...]}")

    def _output(self, prompt: str | None, req: Request) -> RequestOutput:
        params = req.sampling_params
        ids = req.output_token_ids
        completion = CompletionOutput(
            index=0,
            text=self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens),
            token_ids=ids,
            finish_reason=req.status.finish_reason,
            logprobs=list(req.logprobs) if params.logprobs is not None else None,
        )
        return RequestOutput(
            req.request_id, prompt, req.prompt_token_ids, [completion], req.num_cached_tokens
        )


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
            out = llm.chat([{"role": "user", "content": prompt}], params)
        else:
            out = llm.generate(prompt, params)[0]
        print(out.outputs[0].text)
    return 0
