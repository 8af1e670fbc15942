"""A scheduled step as the forward pass takes it: what each sequence runs (``SeqStep``, all a
tensor-parallel rank needs) flattened into one batch of rows (``StepInputs``), decodes first:

    rows      | decode 0 | decode 1 | ... | chunk 0: n0 rows      | chunk 1: n1 rows | ...
    input_ids   its token  ...              its tokens
    positions   start      ...              start .. start + n0 - 1
    slot        (block of the position, position % block_size): where the row's K/V goes

A decode with draft tokens (speculative decoding) is a decode row per token, each attending to
the context up to itself through the decode kernel: every row's K/V is written before any row
attends, so the row of draft j sees the drafts before it, as it would have decoding one a step.

Every integer of a step goes to the device in one copy (on a GPU each copy is a transfer of its
own), then is split into views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scalellm.engine.attention import AttentionBackend, AttentionMetadata, PrefillSpan
from scalellm.engine.scheduler import ScheduledRequest


@dataclass(frozen=True)
class SeqStep:
    """What a step runs of one sequence: everything the ranks need, nothing of the Request."""

    start: int
    """Tokens already in the cache (the request's num_computed_tokens)."""
    token_ids: list[int]
    """The tokens fed this step (positions start, start + 1, ...)."""
    block_ids: list[int]
    samples: bool
    drafts: int = 0
    """The last ``drafts`` tokens are draft tokens (speculative decoding): a token is sampled
    after each of them too, 1 + drafts rows in all."""

    @property
    def decodes(self) -> bool:
        """One new token (and its drafts): its rows run as decode rows."""
        return len(self.token_ids) - self.drafts == 1

    @classmethod
    def of(cls, s: ScheduledRequest) -> SeqStep:
        req, start, d = s.request, s.request.num_computed_tokens, s.num_draft_tokens
        tokens = req.token_ids[start : start + s.num_new_tokens - d] + req.draft_token_ids[:d]
        return cls(start, tokens, req.block_ids, s.samples, d)

    @staticmethod
    def encode(steps: list[SeqStep]) -> list[int]:
        """[count, then per step: start, samples, drafts, n tokens, n blocks, tokens..., blocks...]"""
        out = [len(steps)]
        for s in steps:
            header = [s.start, int(s.samples), s.drafts, len(s.token_ids), len(s.block_ids)]
            out += [*header, *s.token_ids, *s.block_ids]
        return out

    @classmethod
    def decode(cls, values: list[int]) -> list[SeqStep]:
        steps, i = [], 1
        for _ in range(values[0]):
            start, samples, drafts, n, b = values[i : i + 5]
            i += 5
            steps.append(cls(start, values[i : i + n], values[i + n : i + n + b], bool(samples), drafts))
            i += n + b
        return steps


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor
    """Row of each sampling sequence's last token in the flattened batch (and of the tokens
    before its drafts)."""
    sampling: list[int]
    """The step (an index into the step list) of each of sample_indices' rows: a step with drafts
    has 1 + drafts consecutive rows."""
    prefill_offsets: dict[int, int]
    """Row of each prefill step's first token in the flattened batch (by step index)."""


@dataclass
class _Rows:
    """A step flattened on the host, row by row (see the module docstring)."""

    block_size: int
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_blocks: list[int] = field(default_factory=list)
    """The block of each row's new token (its offset is position % block_size)."""
    sample_rows: list[int] = field(default_factory=list)
    sampling: list[int] = field(default_factory=list)
    decode_context: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    prefill_offsets: dict[int, int] = field(default_factory=dict)
    bounds: list[tuple[int, int, int]] = field(default_factory=list)
    """Per prefill chunk: its first row, its length, the tokens cached before it."""
    chunk_tables: list[list[int]] = field(default_factory=list)
    """Per prefill chunk: its blocks from position 0 to its end."""

    def add(self, i: int, s: SeqStep) -> None:
        """Step ``i``'s rows; every decode must come before the first prefill chunk."""
        bs, start, n, offset = self.block_size, s.start, len(s.token_ids), len(self.input_ids)
        if n == 1:  # the common row: kept to plain appends (a 256-decode step is 256 of them)
            assert not self.bounds, "decodes first"
            self.input_ids.append(s.token_ids[0])
            self.positions.append(start)
            self.slot_blocks.append(s.block_ids[start // bs])
            self.decode_context.append(start + 1)
            self.decode_tables.append(s.block_ids)
        elif s.decodes:  # a token and its drafts: a decode row each, seeing the rows before it
            assert not self.bounds, "decodes first"
            self.input_ids.extend(s.token_ids)
            self.positions.extend(range(start, start + n))
            self.slot_blocks.extend(s.block_ids[p // bs] for p in range(start, start + n))
            self.decode_context.extend(range(start + 1, start + n + 1))
            self.decode_tables.extend([s.block_ids] * n)
        else:
            self.input_ids.extend(s.token_ids)
            self.positions.extend(range(start, start + n))
            self.slot_blocks.extend(s.block_ids[p // bs] for p in range(start, start + n))
            self.prefill_offsets[i] = offset
            self.bounds.append((offset, n, start))
            self.chunk_tables.append(s.block_ids[: -(-(start + n) // bs)])
        if s.samples:  # the last row; with drafts, the row before each draft too
            self.sample_rows.extend(range(offset + n - 1 - s.drafts, offset + n))
            self.sampling.extend([i] * (1 + s.drafts))


def build_inputs(
    steps: list[SeqStep],
    block_size: int,
    backend: AttentionBackend,
    upload: Callable[[list[int]], torch.Tensor],
) -> StepInputs:
    """Flatten a step (decodes, one token each, first; then prefill chunks) and put it on the
    device through ``upload`` (a flat list of ints -> an int64 tensor there) in one copy:

        input_ids | positions | slot_blocks | sample_rows | context lens | block tables
        [| prefill bounds | prefill block tables: steps with prefill chunks]
    """
    rows = _Rows(block_size)
    for i, s in enumerate(steps):
        if s.decodes:
            rows.add(i, s)
    for i, s in enumerate(steps):
        if not s.decodes:
            rows.add(i, s)
    decodes, chunks = len(rows.decode_tables), len(rows.bounds)
    tables, width = _padded(rows.decode_tables)
    parts = [rows.input_ids, rows.positions, rows.slot_blocks, rows.sample_rows, rows.decode_context, tables]
    if chunks:
        prefill_tables, prefill_width = _padded(rows.chunk_tables)
        parts += [[v for bound in rows.bounds for v in bound], prefill_tables]
    flat: list[int] = []
    for part in parts:
        flat += part
    views = upload(flat).split([len(part) for part in parts])
    ids_t, pos_t, slots_t, sample_t, context_t, tables_t = views[:6]
    bounds_t = chunk_t = None
    spans: tuple[PrefillSpan, ...] = ()
    if chunks:
        bounds_t, chunk_t = views[6].view(chunks, 3), views[7].view(chunks, prefill_width)
        spans = tuple(
            PrefillSpan(offset, offset + n, start, chunk_t[k, : len(rows.chunk_tables[k])])
            for k, (offset, n, start) in enumerate(rows.bounds)
        )
    meta = AttentionMetadata(
        slot_blocks=slots_t,
        slot_offsets=pos_t % block_size,
        num_decode_tokens=decodes,
        decode_block_tables=tables_t.view(decodes, width) if decodes else None,
        decode_context_lens=context_t if decodes else None,
        prefills=spans,
        backend=backend,
        prefill_bounds=bounds_t,
        prefill_tables=chunk_t,
    )
    meta = backend.prepare(meta, block_size)
    return StepInputs(ids_t, pos_t, meta, sample_t, rows.sampling, rows.prefill_offsets)


def _padded(rows: list[list[int]]) -> tuple[list[int], int]:
    """Rows of block ids padded with 0 to the longest, flattened; and that width."""
    width = max(map(len, rows), default=0)
    flat: list[int] = []
    for ids in rows:
        flat += ids
        flat += [0] * (width - len(ids))
    return flat, width
