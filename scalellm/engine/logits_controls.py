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

Each step is a few tensor operations over the affected rows; the per-request Python work is over
the requests' own token lists and parameters, never the vocabulary.

Every token a request holds is known on the host when its logits are processed: with async
scheduling the engine applies the previous step's tokens (advancing the grammars) after launching
a step's forward pass and before sampling it.
"""

from __future__ import annotations

import torch

from scalellm.engine.grammar import BitmaskFiller
from scalellm.engine.host_copy import to_device, upload
from scalellm.engine.request import Request

NEG_INF = float("-inf")


class LogitsControls:
    def __init__(self) -> None:
        self._bitmasks = BitmaskFiller()

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
        _penalties(logits, requests)
        return logits

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
    rows = [i for i, r in enumerate(requests) if _has_penalty(r)]
    if not rows:
        return
    reqs = [requests[i] for i in rows]
    dev, vocab = logits.device, logits.shape[1]
    index = to_device(rows, dev)
    sub = logits[index]
    counts = _counts([r.output_token_ids for r in reqs], vocab, dev)
    in_output = counts > 0
    repetition = [r.sampling_params.repetition_penalty for r in reqs]
    if any(r != 1.0 for r in repetition):
        seen = in_output | (_counts([r.prompt_token_ids for r in reqs], vocab, dev) > 0)
        factor = torch.where(seen, _column(repetition, sub), torch.ones_like(sub))
        sub = torch.where(sub > 0, sub / factor, sub * factor)
    frequency = _column([r.sampling_params.frequency_penalty for r in reqs], sub)
    presence = _column([r.sampling_params.presence_penalty for r in reqs], sub)
    logits[index] = sub - frequency * counts - presence * in_output


def _has_penalty(req: Request) -> bool:
    p = req.sampling_params
    return p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0


def _counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """float [len(token_lists), vocab]: how often each token occurs in each list (padding goes
    to an extra column that is dropped)."""
    width = max(1, max(len(t) for t in token_lists))
    padded = to_device([t + [vocab] * (width - len(t)) for t in token_lists], device)
    counts = torch.zeros((len(token_lists), vocab + 1), device=device)
    counts.scatter_add_(1, padded, torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.device, like.dtype).unsqueeze(1)
