"""The controls a request may put on its logits before sampling, applied to a whole batch at once.

In vLLM's order, on the rows of the requests that use any (the others are not touched, and a
batch where none does costs one pass over its SamplingParams):

    1. allowed_token_ids   every token not in the list                      -> -inf
       structured output   tokens its grammar does not allow next          -> -inf
    2. bad words           the last token of a sequence the output ends on -> -inf
    3. min_tokens          EOS and stop token ids, while output < min_tokens -> -inf
    4. logit_bias          logit += bias
    5. penalties (seen: token in prompt or output; count: times in output)
         repetition  logit = logit / r if logit > 0 else logit * r   where seen
         frequency   logit -= f * count
         presence    logit -= p * (count > 0)

Each step is a few tensor operations over the affected rows (the penalties on CPU: one C++ call,
csrc/penalties.cpp); the per-request Python work is over the requests' own token lists and
parameters, never the vocabulary.

Every token a request holds is known on the host when its logits are processed: with async
scheduling the engine applies the previous step's tokens (advancing the grammars) after launching
a step's forward pass and before sampling it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from scalellm.engine.grammar import BitmaskFiller
from scalellm.engine.host_copy import host_ints, to_device, upload
from scalellm.engine.request import Request

NEG_INF = float("-inf")

Penalize = Callable[
    [torch.Tensor, list[int], list[list[int]], list[int], list[float], list[float], list[float]], None
]
"""(logits [N, V] float32 on the host, rows, each row's request's token_ids (its prompt, then its
output), prompt lengths, repetition, frequency and presence penalties): the penalties applied in
place, as ``_penalties`` applies them (cpu_kernels.penalize)."""


class LogitsControls:
    def __init__(self, penalize: Penalize | None = None) -> None:
        """``penalize``: the penalties' kernel for float32 logits on the host; None: torch's ops."""
        self._bitmasks = BitmaskFiller()
        self._penalize = penalize

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The logits [N, V] with every request's controls applied: the same tensor when no
        request has any, otherwise a processed copy (the raw logits stay for logprobs)."""
        if not any(r.sampling_params.uses_logits_controls for r in requests):
            return logits
        logits = logits.clone()
        _allow(logits, requests)
        self._grammar(logits, requests)
        _ban(logits, requests)
        _bias(logits, requests)
        self._penalties(logits, requests)
        return logits

    def _penalties(self, logits: torch.Tensor, requests: list[Request]) -> None:
        if self._penalize is None or logits.device.type != "cpu" or logits.dtype != torch.float32:
            _penalties(logits, requests)
            return
        rows = [i for i, r in enumerate(requests) if _has_penalty(r)]
        if not rows:
            return
        reqs = [requests[i] for i in rows]
        params = [r.sampling_params for r in reqs]
        self._penalize(
            logits,
            rows,
            [r.token_ids for r in reqs],
            [r.num_prompt_tokens for r in reqs],
            [p.repetition_penalty for p in params],
            [p.frequency_penalty for p in params],
            [p.presence_penalty for p in params],
        )

    def _grammar(self, logits: torch.Tensor, requests: list[Request]) -> None:
        # a finished request's row (async scheduling: it stopped in the step before) is discarded
        rows = [i for i, r in enumerate(requests) if r.grammar is not None and not r.grammar.done]
        if not rows:
            return
        matchers = [m for m in (requests[i].grammar for i in rows) if m is not None]
        allowed = upload(self._bitmasks.allowed(matchers, logits.shape[1]), logits.device)
        index = to_device(rows, logits.device)
        logits[index] = logits[index].masked_fill(~allowed, NEG_INF)


def _allow(logits: torch.Tensor, requests: list[Request]) -> None:
    """allowed_token_ids: a row's logits outside its list become -inf (one masked fill)."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.allowed_token_ids]
    if not rows:
        return
    ids = [requests[i].sampling_params.allowed_token_ids for i in rows]
    dev = logits.device
    keep = torch.zeros((len(rows), logits.shape[1]), dtype=torch.bool, device=dev)
    which = to_device([n for n, row in enumerate(ids) for _ in row], dev)
    keep[which, to_device([t for row in ids for t in row], dev)] = True
    index = to_device(rows, dev)
    logits[index] = logits[index].masked_fill(~keep, NEG_INF)


def _ban(logits: torch.Tensor, requests: list[Request]) -> None:
    """Bad words and min_tokens: one scatter of -inf over (row, token) pairs."""
    rows: list[int] = []
    tokens: list[int] = []
    for i, req in enumerate(requests):
        banned = _banned(req)
        rows.extend([i] * len(banned))
        tokens.extend(banned)
    if rows:
        dev = logits.device
        logits[to_device(rows, dev), to_device(tokens, dev)] = NEG_INF


def _banned(req: Request) -> list[int]:
    params = req.sampling_params
    out: list[int] = []
    if params.bad_words_token_ids:
        output = req.output_token_ids
        for seq in params.bad_words_token_ids:
            prefix = len(seq) - 1
            if prefix == 0 or (len(output) >= prefix and tuple(output[-prefix:]) == seq[:-1]):
                out.append(seq[-1])
    if params.min_tokens > req.num_output_tokens:
        out.extend(params.stop_token_ids)
        if not params.ignore_eos:
            out.extend(req.eos_token_ids)
    return out


def _bias(logits: torch.Tensor, requests: list[Request]) -> None:
    rows: list[int] = []
    tokens: list[int] = []
    values: list[float] = []
    for i, req in enumerate(requests):
        for token, bias in req.sampling_params.logit_bias:
            rows.append(i)
            tokens.append(token)
            values.append(bias)
    if rows:
        dev = logits.device
        index = (to_device(rows, dev), to_device(tokens, dev))
        logits.index_put_(index, to_device(values, dev, logits.dtype), accumulate=True)


def _penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """Repetition, frequency and presence penalties, on the (row, token) pairs they touch only:
    the tokens each request's output holds (and its prompt's, where a row of the batch has a
    repetition penalty), not the whole vocabulary of every row (64 rows of a 49k vocabulary
    made ~10 passes over 12.5 MB: ~20 ms a step)."""
    rows = [i for i, r in enumerate(requests) if _has_penalty(r)]
    if not rows:
        return
    reqs = [requests[i] for i in rows]
    dev, vocab = logits.device, logits.shape[1]
    # keys: local row * vocab + token, sorted and unique; counts: times in the output
    out_keys, counts = _keys([r.output_token_ids for r in reqs], vocab, dev).unique(return_counts=True)
    repetition = [r.sampling_params.repetition_penalty for r in reqs]
    repeats = any(r != 1.0 for r in repetition)
    if not repeats:
        keys, in_output, count = out_keys, torch.ones_like(out_keys, dtype=torch.bool), counts
    else:  # seen: in the prompt or the output
        keys = torch.cat([out_keys, _keys([r.prompt_token_ids for r in reqs], vocab, dev)]).unique()
        if len(out_keys):
            at = torch.searchsorted(out_keys, keys).clamp_(max=len(out_keys) - 1)
            in_output = out_keys[at] == keys
            count = torch.where(in_output, counts[at], 0)
        else:  # no output yet (a prompt's first token): the prompt's tokens, for repetition
            in_output, count = torch.zeros_like(keys, dtype=torch.bool), torch.zeros_like(keys)
    local, token = keys // vocab, keys % vocab
    row = to_device(rows, dev)[local]
    value = logits[row, token]
    if repeats:
        factor = to_device(repetition, dev, logits.dtype)[local]
        value = torch.where(value > 0, value / factor, value * factor)
    frequency = to_device([r.sampling_params.frequency_penalty for r in reqs], dev, logits.dtype)[local]
    presence = to_device([r.sampling_params.presence_penalty for r in reqs], dev, logits.dtype)[local]
    logits[row, token] = value - frequency * count.to(logits.dtype) - presence * in_output.to(logits.dtype)


def _has_penalty(req: Request) -> bool:
    p = req.sampling_params
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _keys(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """int64 [total tokens]: row * vocab + token for each token of each row's list. The lists go
    through an array of int64 (C speed: 64 lists of 768 tokens in ~2 ms, ~10 as a list of keys)."""
    rows = torch.arange(len(token_lists)) * vocab
    keys = host_ints(itertools.chain.from_iterable(token_lists)) + rows.repeat_interleave(
        torch.tensor([len(t) for t in token_lists])
    )
    return upload(keys, device)
