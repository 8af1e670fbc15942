"""Token sampling, vectorised over the batch.

Per row: the request's logits controls (structured output, bad words, min_tokens, logit_bias,
penalties: logits_controls.py), then greedy (argmax) or temperature -> top-k -> top-p -> min-p ->
a draw.
A draw is ``argmax(p / e)`` with ``e ~ Exp(1)`` per vocabulary entry (the exponential race), so a
request with a seed uses its own generator for its own row and gets the same tokens whatever
else is in the batch. Each ``e`` belongs to a token id, not to a rank: whether the batch sorts
its rows (another row's top-k or top-p) must not change which token a draw picks. Logprobs are those of the model's raw distribution (before temperature
and truncation), as vLLM and OpenAI report them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scalellm.engine.host_copy import to_device
from scalellm.engine.logits_controls import LogitsControls
from scalellm.engine.request import Request
from scalellm.types import SamplingParams, TokenLogprobs


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass(frozen=True)
class Drawn:
    """``Sampler.draw``'s tokens and logprobs, still on the device."""

    token_ids: torch.Tensor
    """[N]"""
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """``logprob_tensors``' (chosen, top values, top ids) when any row asked for logprobs."""
    want: list[int | None]
    """Each row's logprobs setting (None: none)."""

    def tensors(self) -> list[torch.Tensor]:
        return [self.token_ids, *(self.logprobs or ())]

    def output(self, host: list[torch.Tensor]) -> SamplerOutput:
        """The SamplerOutput of ``tensors()`` once they are on the host."""
        ids = host[0].tolist()
        if self.logprobs is None:
            return SamplerOutput(ids, [None] * len(ids))
        chosen, values, indices = (t.tolist() for t in host[1:])
        return SamplerOutput(ids, assemble_logprobs(ids, chosen, values, indices, self.want))


def _plain_greedy(params: list[SamplingParams]) -> bool:
    """Every row greedy with neither logprobs nor logits controls: one argmax over the logits."""
    return all(p.greedy and p.logprobs is None and not p.uses_logits_controls for p in params)


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


class Sampler:
    def __init__(
        self, device: torch.device, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """``argmax``: [N, V] -> [N], ``torch.argmax(dim=-1)``'s indices (cpu_kernels.argmax on
        CPU); None: torch's."""
        self.device = device
        self._argmax = argmax or torch_argmax
        self._generators: dict[str, torch.Generator] = {}
        self._before: dict[str, tuple[torch.Tensor, int]] = {}
        """A seeded request sampling several rows (draft tokens): its generator's state before
        them and the draws' width, until keep_draws says how many rows it keeps."""
        self._controls = LogitsControls()

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(request_id, None)
        self._before.pop(request_id, None)

    def keep_draws(self, request_id: str, rows: int, drawn: int) -> None:
        """A seeded request drew for each of its ``drawn`` rows (a token and its drafts) but keeps
        the tokens of the first ``rows``: its generator goes back to where it stood after those
        draws, so that its next token is drawn as it would have been without drafts."""
        before = self._before.pop(request_id, None)
        gen = self._generators.get(request_id)
        if before is None or gen is None or rows == drawn:
            return
        state, width = before
        gen.set_state(state)
        _skip_draws(gen, width, rows)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """``draw``'s tokens and logprobs on the host."""
        drawn = self.draw(logits, requests)
        return drawn.output(drawn.tensors())

    @torch.inference_mode()
    def draw(self, logits: torch.Tensor, requests: list[Request]) -> Drawn:
        """logits [N, V] in the model's dtype, one row per request, in order: the tokens (and
        logprobs where asked for) on the logits' device, without waiting for them. A batch of
        plain greedy rows takes the argmax of those logits as they are (widening to float32 is
        exact, so the index is the same); anything else works on a float32 copy."""
        params = [r.sampling_params for r in requests]
        want = [p.logprobs for p in params]
        if _plain_greedy(params):
            return Drawn(self._argmax(logits), None, want)
        logits = logits.float()
        token_ids = self._pick(self._controls(logits, requests), requests)
        if all(n is None for n in want):
            return Drawn(token_ids, None, want)
        return Drawn(token_ids, logprob_tensors(logits, token_ids, max(n or 0 for n in want)), want)

    def _pick(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Greedy rows' argmax, the other rows' draws, from processed float32 logits."""
        random_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if len(random_rows) == len(requests):  # no argmax, no copy of the rows
            return self._sample(logits, requests)
        token_ids = self._argmax(logits)
        if random_rows:
            token_ids = token_ids.clone()
            rows = to_device(random_rows, logits.device)
            token_ids[rows] = self._sample(logits[rows], [requests[i] for i in random_rows])
        return token_ids

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        dev = logits.device
        vocab = logits.shape[-1]
        temps = to_device([p.temperature for p in params], dev, logits.dtype)
        logits = logits / temps.unsqueeze(1)
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p for p in params]
        needs_sort = any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p)
        order: torch.Tensor | None = None
        if needs_sort:
            logits, order = logits.sort(dim=-1, descending=True)
            ranks = torch.arange(vocab, device=dev).unsqueeze(0)
            logits = logits.masked_fill(ranks >= to_device(top_k, dev).unsqueeze(1), float("-inf"))
        probs = logits.softmax(dim=-1)
        if needs_sort and any(p < 1.0 for p in top_p):
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            cut = before >= to_device(top_p, dev, probs.dtype).unsqueeze(1)
            probs = probs.masked_fill(cut, 0.0)  # the top token is never cut (before == 0)
        if any(m > 0.0 for m in min_p):
            floor = to_device(min_p, dev, probs.dtype).unsqueeze(1)
            probs = probs.masked_fill(probs < floor * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = self._exponential(probs, requests)  # one draw per token id, in vocabulary order
        if order is not None:
            noise = noise.gather(1, order)  # follows its token: the draw never depends on the batch
        choice = (probs / noise).argmax(dim=-1)
        return order.gather(1, choice.unsqueeze(1)).squeeze(1) if order is not None else choice

    def _exponential(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Exp(1) noise per row: -log U of uniform draws, a seeded request's from its generator.

        U = 0 (one float32 draw in 2^24) gives inf, and its token sits that draw out. Uniforms
        and a log rather than ``exponential_``: on the 2-core AVX2 VM torch's CPU exponential_
        took 1.05 ms a row of the demo model's 49k-token vocabulary, uniform_ and the log 0.2."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.sampling_params.seed is None]
        if len(unseeded) == len(requests):
            noise.uniform_()
        elif unseeded:
            index = to_device(unseeded, noise.device)
            noise.index_copy_(0, index, torch.rand(len(unseeded), noise.shape[1], device=noise.device))
        several = {r.request_id for r, nxt in itertools.pairwise(requests) if r is nxt}
        for i, req in enumerate(requests):
            seed = req.sampling_params.seed
            if seed is None:
                continue
            gen = self._generators.get(req.request_id)
            if gen is None:
                gen = torch.Generator(device=probs.device)
                gen.manual_seed(seed)
                # A request continued on another worker (disaggregated decode) already drew once per
                # token it has: skip those draws so its stream matches the engine alone.
                _skip_draws(gen, noise.shape[1], req.num_output_tokens)
                self._generators[req.request_id] = gen
            if req.request_id in several and (i == 0 or requests[i - 1] is not req):
                self._before[req.request_id] = (gen.get_state(), noise.shape[1])
            noise[i].uniform_(generator=gen)
        return noise.log_().neg_()


def _skip_draws(gen: torch.Generator, width: int, draws: int) -> None:
    """Advance a request's generator past ``draws`` rows of noise (``_exponential``'s)."""
    for _ in range(draws):
        torch.empty(width, device=gen.device).uniform_(generator=gen)


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, want: list[int | None] | list[int]
) -> list[TokenLogprobs | None]:
    """Per row: the logprob of token_ids[row] under the row's logits and the top want[row] (None:
    nothing for that row)."""
    chosen, values, indices = logprob_tensors(logits, token_ids, max(n or 0 for n in want))
    return assemble_logprobs(token_ids.tolist(), chosen.tolist(), values.tolist(), indices.tolist(), want)


def logprob_tensors(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' log-softmax at token_ids [N], and its top k values and ids [N, k]."""
    logprobs = logits.log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    values, indices = logprobs.topk(k, dim=-1)
    return chosen, values, indices


def assemble_logprobs(
    ids: list[int],
    chosen: list[float],
    top_vals: list[list[float]],
    top_ids: list[list[int]],
    want: list[int | None] | list[int],
) -> list[TokenLogprobs | None]:
    """logprob_tensors' values, on the host, as each row's TokenLogprobs (None where not wanted)."""
    out: list[TokenLogprobs | None] = []
    for i, n in enumerate(want):
        if n is None:
            out.append(None)
            continue
        top = tuple(zip(top_ids[i][:n], top_vals[i][:n], strict=True)) if n else ()
        out.append(TokenLogprobs(ids[i], chosen[i], top))
    return out
