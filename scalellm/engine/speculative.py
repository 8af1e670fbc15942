"""Speculative decoding by prompt lookup: draft tokens copied from the sequence itself, verified
by the model in one step.

A decode step on a CPU (and a small batch on a GPU) reads every weight for one token per
sequence; feeding 1 + k tokens of a sequence costs little more, because the weights are read
once either way. When the output repeats something already in the sequence (code being edited,
a quoted document, a list's pattern), the tokens that followed the last earlier occurrence of
its final n tokens are a good guess for what comes next:

    tokens   ... a b c d e f ... x a b c          (n = 3: the last 3 tokens occurred before)
    drafts             d e f                      (up to k tokens that followed them)

The step feeds the last token and the drafts, ``[c d e f]``, at positions ``L-1 .. L-1+k``, each
as a decode row whose context ends at itself (step_inputs.py); the row of each position predicts
the next token, ``t0 t1 t2 t3``. The model
agrees with the first ``a`` drafts when ``t0 = d``, ``t1 = e``, ...; the step then yields
``t0 .. ta``: the accepted drafts and the model's own next token, every one exactly what
decoding one token a step would have given. The K/V written for rejected drafts lies past the
sequence's computed tokens and is overwritten by the next step.

Each row's token is drawn as decoding draws it (the argmax, or the sampler's draw from the row's
distribution), so acceptance is plain equality. For a sampled request that is exact too: t0 is
drawn from the model's distribution after ``c``; when it equals the draft ``d``, row 1's
distribution is the one after ``c d``, so t1 is what a second step would have drawn; the first
disagreement is a draw from the right distribution that the drafts did not predict. (With a
draft that is a single token this is rejection sampling itself: accept d with probability p(d),
else draw from p without d.) A seeded request's generator is set back to after the rows it keeps
(Sampler.keep_draws): its tokens are the ones it gets without drafts. Requests with logits
controls (penalties, bias, bad words, min_tokens, allowed_token_ids, structured output) do not
draft: those read the output so far, which for a draft row would have to include the drafts
before it. A step takes drafts only up to ``max_rows``
decode rows in all (scheduler.py, from what is left of its token budget): past a few rows a
step is no longer bound by reading the weights and every draft costs a token's arithmetic.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from scalellm.engine.request import Request


def as_words(token_ids: Sequence[int]) -> bytes:
    """Token ids as 4-byte words: what ``propose`` searches."""
    return array.array("I", token_ids).tobytes()


def propose(
    token_ids: Sequence[int], k: int, min_n: int, max_n: int, words: bytes | bytearray | None = None
) -> list[int]:
    """Up to ``k`` tokens that followed the last earlier occurrence of the sequence's final n
    tokens, for the largest n in [min_n, max_n] that occurred before; [] when none did.

    The search runs in C: the ids as 4-byte words (``words``, as_words(token_ids) when not
    given), ``bytes.rfind`` for the final n words, a match at an offset that is not a word
    boundary skipped."""
    length = len(token_ids)
    if k < 1 or length < min_n + 1:
        return []
    if words is None:
        words = as_words(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = words[4 * (length - n) :]
        end = 4 * (length - 1)  # an occurrence must end before the last token
        while (at := words.rfind(suffix, 0, end)) >= 0 and at % 4:
            end = at + len(suffix) - 1
        if at >= 0:
            start = at // 4 + n
            return list(token_ids[start : start + k])
    return []


def speculates(req: Request) -> bool:
    """Whether the request's next tokens may be drafted: no logits controls (each row's logits
    are used as they come), decoding, with more than one token left to generate."""
    p = req.sampling_params
    return (
        p.prompt_logprobs is None
        and not p.uses_logits_controls
        and req.num_tokens - req.num_computed_tokens == 1
        and not req.awaiting_token
        and req.max_tokens - req.num_output_tokens > 1
    )


def accepted(drafts: Sequence[int], targets: Sequence[int]) -> list[int]:
    """The tokens a verified chunk yields: ``targets`` (the argmax of each row, len(drafts) + 1)
    up to and including the first one that differs from its draft."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return list(targets[: a + 1])


@dataclass
class NgramDrafter:
    """Drafts for the running requests before each step (module docstring); counts what was
    drafted and accepted for metrics."""

    num_tokens: int
    """k: most drafts per request and step."""
    min_n: int = 2
    max_n: int = 4
    max_rows: int = 6
    """No drafts when this many requests (or more) run: a step would have no row to spare."""
    drafted: int = 0
    """Draft tokens verified so far."""
    accepted: int = 0
    """Of those, the ones the model agreed with."""
    _words: dict[str, tuple[Request, bytearray]] = field(default_factory=dict, repr=False)
    """Each drafting request's tokens as words, grown by the tokens added since the last step
    (converting a long sequence every step would cost ~80 us at 8k tokens); only the running
    requests' are kept."""

    def draft(self, running: Sequence[Request]) -> None:
        """Set every running request's ``draft_token_ids`` for the next step ([] for those that
        do not draft, and for all of them when no row is left for drafts)."""
        busy = len(running) >= self.max_rows
        kept: dict[str, tuple[Request, bytearray]] = {}
        for req in running:
            room = req.max_tokens - req.num_output_tokens - 1  # the model's own token comes on top
            drafts: list[int] = []
            if not busy and speculates(req):
                words = self._words_of(req)
                kept[req.request_id] = (req, words)
                drafts = propose(req.token_ids, min(self.num_tokens, room), self.min_n, self.max_n, words)
            req.draft_token_ids = drafts
        self._words = kept

    def _words_of(self, req: Request) -> bytearray:
        """``as_words(req.token_ids)``, from the last step's words plus the new tokens."""
        request, words = self._words.get(req.request_id, (None, bytearray()))
        have = len(words) // 4
        if request is not req or have > req.num_tokens:  # another request under a reused id
            words, have = bytearray(), 0
        words += as_words(req.token_ids[have:])
        return words

    def count(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
