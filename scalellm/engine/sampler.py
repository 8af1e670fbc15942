"""Token sampling, vectorised over the batch.

Per row: the request's logits controls (structured output, bad words, min_tokens, logit_bias,
penalties: logits_controls.py), then greedy (argmax) or temperature -> top-k -> top-p -> min-p ->
a draw. A request with a seed draws from its own generator, so it gets the same tokens whatever
else is in the batch.

With a device's kernels (``SamplerKernels``; CPU: csrc/sample.cpp) every sampled row inverts its
CDF with one uniform: a seeded row's from its generator, one draw per token. With torch's ops
(GPUs) top-k and top-p look at a row's 64 largest logits (``truncate``; CANDIDATES), then 1024,
then all of them, as far as its top-p needs: not a sort of the vocabulary. An unseeded draw
inverts the row's CDF with one uniform; a seeded one is ``argmax(p / e)`` with ``e ~ Exp(1)`` per
vocabulary entry (the exponential race). Each ``e`` belongs to a token id, not to a rank: how
the row was truncated (its own candidates, or the whole vocabulary) must not change which token
a draw picks. A seed's tokens therefore differ between the two paths (as between devices).

Logprobs are those of the model's raw distribution (before temperature and truncation), as vLLM
and OpenAI report them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scalellm.engine.host_copy import to_device
from scalellm.engine.logits_controls import LogitsControls, Penalize
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


SampleRows = Callable[
    [torch.Tensor, list[float], list[int], list[float], list[float], torch.Tensor], torch.Tensor
]
"""(logits [N, V], temperature, top_k, top_p, min_p, uniforms [N]) -> [N] token ids: the tokens
``_sample_torch`` keeps for those parameters (top_k 0: none), the one whose running sum first
exceeds u times their mass (cpu_kernels.sample)."""

LogprobRows = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(logits [N, V], token_ids [N], k) -> ``logprob_tensors``' (chosen, top values, top ids), in
float32 whatever the logits' dtype (cpu_kernels.logprobs)."""


@dataclass(frozen=True)
class SamplerKernels:
    """A device's own passes over the vocabulary for the sampler (cpu_kernels.sampler_kernels on
    CPU), each taking the logits in the model's dtype; None: torch's ops (sampling and logprobs
    over a float32 copy)."""

    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
    """[N, V] -> [N], ``torch.argmax(dim=-1)``'s indices."""
    sample_rows: SampleRows | None = None
    """The draw of sampled rows, a uniform a row (a seeded row's from its own generator)."""
    logprobs: LogprobRows | None = None
    penalties: Penalize | None = None
    """Repetition, frequency and presence penalties on float32 logits."""


class Sampler:
    def __init__(self, device: torch.device, kernels: SamplerKernels = SamplerKernels()) -> None:
        """``kernels``: the device's own passes over the vocabulary; by default torch's ops."""
        self.device = device
        self._argmax = kernels.argmax or torch_argmax
        self._sample_rows = kernels.sample_rows
        self._logprobs = kernels.logprobs
        self._generators: dict[str, torch.Generator] = {}
        self._before: dict[str, tuple[torch.Tensor, int]] = {}
        """A seeded request sampling several rows (draft tokens): its generator's state before
        them and the draws' width, until keep_draws says how many rows it keeps."""
        self._controls = LogitsControls(kernels.penalties)

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
        logprobs where asked for) on the logits' device, without waiting for them. Greedy rows
        take the argmax of those logits as they are (widening to float32 is exact, so the index
        is the same), and so do the kernels where there are (they widen as they read); logits
        controls and torch's sampling and logprobs work on a float32 copy."""
        params = [r.sampling_params for r in requests]
        want = [p.logprobs for p in params]
        if _plain_greedy(params):
            return Drawn(self._argmax(logits), None, want)
        logprobs = any(n is not None for n in want)
        if (
            self._sample_rows is None
            or any(p.uses_logits_controls for p in params)
            or (logprobs and self._logprobs is None)
        ):
            logits = logits.float()
        token_ids = self._pick(self._controls(logits, requests), requests)
        if not logprobs:
            return Drawn(token_ids, None, want)
        return Drawn(token_ids, self._logprob_rows(logits, token_ids, max(n or 0 for n in want)), want)

    def token_logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[TokenLogprobs]:
        """Per row of logits [N, V] (the model's dtype): the logprob of token_ids[row] and the top
        k (prompt logprobs)."""
        chosen, values, indices = self._logprob_rows(logits, token_ids, k)
        ids, want = token_ids.tolist(), [k] * len(chosen)
        found = assemble_logprobs(ids, chosen.tolist(), values.tolist(), indices.tolist(), want)
        return [lp for lp in found if lp is not None]

    def _logprob_rows(
        self, logits: torch.Tensor, token_ids: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._logprobs is None:
            return logprob_tensors(logits.float(), token_ids, k)
        return self._logprobs(logits, token_ids, k)

    def _pick(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Greedy rows' argmax, the other rows' draws, from the processed logits."""
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
        """Each row's draw: by ``sample_rows`` where there is one, with a uniform a row (a seeded
        row's from its request's generator, the others' from torch's), else ``_sample_torch``'s."""
        if self._sample_rows is None:
            return self._sample_torch(logits.float(), requests)
        params = [r.sampling_params for r in requests]
        vocab = logits.shape[-1]
        uniforms = torch.rand(len(requests))
        seeded = self._seeded_uniforms(requests, 1, uniforms.device)
        if seeded:
            uniforms[list(seeded)] = torch.cat(list(seeded.values()))
        return self._sample_rows(
            logits,
            [p.temperature for p in params],
            [p.top_k if 0 < p.top_k < vocab else 0 for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
            uniforms,
        )

    def _sample_torch(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Each row's draw: temperature; top-k and top-p where the row asks for them, over its
        largest logits a rung at a time (``truncate`` over ``_width``'s, then ``_wider``'s, as
        far as its top-p needs), else its whole distribution; then min-p and ``_draw``. Which
        rung a row ends on depends on its own parameters and logits only, and its seeded
        uniforms are drawn first, in row order, so its token never depends on the batch."""
        params = [r.sampling_params for r in requests]
        vocab, device = logits.shape[-1], logits.device
        logits = logits / to_device([p.temperature for p in params], device, logits.dtype).unsqueeze(1)
        seeded = self._seeded_uniforms(requests, vocab, device)  # the race: a uniform per token
        by_width: dict[int, list[int]] = {}
        for i, p in enumerate(params):
            by_width.setdefault(_width(p, vocab, device), []).append(i)
        token_ids = torch.empty(len(requests), dtype=torch.long, device=device)
        while by_width:
            width = min(by_width)
            rows = by_width.pop(width)
            part = logits if len(rows) == len(requests) else logits[to_device(rows, device)]
            if width == 0:  # neither top-k nor top-p: the whole distribution, in vocabulary order
                probs, ids = part.softmax(dim=-1), None
            else:
                group = [params[i] for i in rows]
                top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in group]
                probs, ids, complete = truncate(part, top_k, [p.top_p for p in group], width)
                if width < vocab and not bool(complete.all()):
                    # top-p past these candidates: those rows go up a rung, a wider width, so
                    # taken later, and their tokens drawn there replace the ones drawn here
                    by_width.setdefault(_wider(width, vocab), []).extend(
                        i for i, ok in zip(rows, complete.tolist(), strict=True) if not ok
                    )
            # a seeded row's tokens take their own uniforms (its row's, in vocabulary order)
            mine = {
                j: seeded[i] if ids is None else seeded[i][ids[j]] for j, i in enumerate(rows) if i in seeded
            }
            token_ids[to_device(rows, device)] = _draw(probs, ids, [params[i].min_p for i in rows], mine)
        return token_ids

    def _seeded_uniforms(
        self, requests: list[Request], width: int, device: torch.device
    ) -> dict[int, torch.Tensor]:
        """Row -> ``width`` uniforms from the row's request's generator, for rows with a seed,
        drawn in row order (a request's rows: its token, then its drafts): one a row for
        ``sample_rows``, one per vocabulary entry for ``_sample_torch``'s race.

        Uniforms (the race's -log U, ``_draw``) rather than ``exponential_``: on the 2-core AVX2
        VM torch's CPU exponential_ took 1.05 ms a row of the demo model's 49k-token vocabulary,
        uniform_ and the log 0.2."""
        drawn: dict[int, torch.Tensor] = {}
        several = {r.request_id for r, nxt in itertools.pairwise(requests) if r is nxt}
        for i, req in enumerate(requests):
            seed = req.sampling_params.seed
            if seed is None:
                continue
            gen = self._generators.get(req.request_id)
            if gen is None:
                gen = torch.Generator(device=device)
                gen.manual_seed(seed)
                # A request continued on another worker (disaggregated decode) already drew once per
                # token it has: skip those draws so its stream matches the engine alone.
                _skip_draws(gen, width, req.num_output_tokens)
                self._generators[req.request_id] = gen
            if req.request_id in several and (i == 0 or requests[i - 1] is not req):
                self._before[req.request_id] = (gen.get_state(), width)
            drawn[i] = torch.empty(width, device=device).uniform_(generator=gen)
        return drawn


def _width(params: SamplingParams, vocab: int, device: torch.device) -> int:
    """The logits a row's truncation looks at first: 0 for none (no top-k, no top-p), else the
    first of CANDIDATES (or its top_k, where larger) on CPU; the whole vocabulary elsewhere (a
    GPU sorts it in well under a millisecond, and rungs would read ``complete`` on the host)."""
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    if not top_k and params.top_p >= 1.0:
        return 0
    return min(vocab, max(CANDIDATES[0], top_k)) if device.type == "cpu" else vocab


def _wider(width: int, vocab: int) -> int:
    """The rung after ``width``: the next of CANDIDATES, then the whole vocabulary."""
    return min(vocab, next((c for c in CANDIDATES if c > width), vocab))


def _draw(
    probs: torch.Tensor, ids: torch.Tensor | None, min_p: list[float], seeded: dict[int, torch.Tensor]
) -> torch.Tensor:
    """min-p, then a token for each row: probs [N, W] of the token ids ``ids`` [N, W] (None: the
    whole vocabulary, in order) -> [N] token ids.

    An unseeded row inverts its CDF: one uniform u times its mass, the first token whose running
    sum exceeds it (64 rows of the demo model's 49k tokens: ~1.6 ms on 2 Zen 4 cores, against ~24
    for a uniform per entry). A seeded row j runs the exponential race argmax(p / e), e = -log U,
    with ``seeded[j]``'s uniform per entry (from its generator; U = 0, one float32 draw in 2^24,
    gives e = inf and its token sits that draw out), so that its token depends on its own draws
    only, whatever the batch."""
    if any(m > 0.0 for m in min_p):
        floor = to_device(min_p, probs.device, probs.dtype).unsqueeze(1)
        probs = probs.masked_fill(probs < floor * probs.max(dim=-1, keepdim=True).values, 0.0)
    cdf = probs.cumsum(dim=-1)
    mass = cdf[:, -1:]
    # u < mass, also where rounding r * mass would reach it: the token found has p > 0
    u = torch.minimum(
        torch.rand(len(probs), 1, device=probs.device) * mass, torch.nextafter(mass, torch.zeros_like(mass))
    )
    choice = torch.searchsorted(cdf, u, right=True).squeeze(1)  # the first token whose running sum exceeds u
    if seeded:
        rows = to_device(list(seeded), probs.device)
        uniforms = torch.stack(list(seeded.values()))
        choice[rows] = (probs[rows] / uniforms.log_().neg_()).argmax(dim=-1)
    return ids.gather(1, choice.unsqueeze(1)).squeeze(1) if ids is not None else choice


CANDIDATES = (64, 1024)
"""The rungs of a row's top-k / top-p truncation on CPU: the ``topk`` of its 64 largest logits
(or its top_k, where larger), then of 1024 where top-p needs more (a flatter distribution),
then a sort of the whole vocabulary. On 2 Zen 4 cores, 64 rows of the demo model's 49k tokens:
topk 2.8 ms at 64, 15 at 1024, a sort 112 (docs/benchmarks.md)."""


def truncate(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k, then top-p, over each row's ``width`` largest logits [N, V] (temperature applied):
    (probs [N, width], their token ids [N, width], complete [N]). Row r keeps its top_k[r]
    largest (top_k[r] = V: all), renormalized over those, then the fewest of them, largest first,
    whose mass reaches top_p[r] (a token is cut when the mass strictly above it already does):

        sorted probs   0.50  0.30  0.15  0.04  0.01 ...     top_p 0.9
        mass above     0     0.50  0.80  0.95  0.99         kept: the first three

    ``complete[r]`` is false where the row's kept tokens may reach past the ``width`` looked at
    (no top_k within them and their mass under top_p): the caller goes again with width V.
    """
    vocab, device = logits.shape[-1], logits.device
    values, ids = logits.topk(width, dim=-1)  # sorted, largest first
    k = to_device(top_k, device).unsqueeze(1)
    values = values.masked_fill(torch.arange(width, device=device).unsqueeze(0) >= k, float("-inf"))
    has_k = k.squeeze(1) < vocab
    total = values.logsumexp(dim=-1)  # the normalizer: over a row's top_k, else its whole vocabulary
    if any(n >= vocab for n in top_k):
        total = torch.where(has_k, total, logits.logsumexp(dim=-1))
    probs = (values - total.unsqueeze(1)).exp()
    p = to_device(top_p, device, probs.dtype)
    mass = probs.cumsum(dim=-1)
    complete = has_k & (k.squeeze(1) <= width) | (mass[:, -1] >= p) | (width == vocab)
    if any(x < 1.0 for x in top_p):
        probs = probs.masked_fill(mass - probs >= p.unsqueeze(1), 0.0)  # the top token always stays
    return probs, ids, complete


def _skip_draws(gen: torch.Generator, width: int, draws: int) -> None:
    """Advance a request's generator past ``draws`` rows of ``width`` uniforms (``_seeded_uniforms``')."""
    for _ in range(draws):
        torch.empty(width, device=gen.device).uniform_(generator=gen)


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
