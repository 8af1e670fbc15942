"""step_inputs.build_inputs: a step's rows as the forward pass reads them (decodes first, then
prefill chunks), every integer in one upload."""

from __future__ import annotations

import torch

from scalellm.engine.attention import TorchSDPA
from scalellm.engine.step_inputs import SeqStep, build_inputs

BLOCK = 4


def test_decodes_come_first_then_chunks_with_their_slots_tables_and_sampling_rows() -> None:
    uploads: list[list[int]] = []

    def upload(values: list[int]) -> torch.Tensor:
        uploads.append(values)
        return torch.tensor(values, dtype=torch.long)

    steps = [
        SeqStep(start=4, token_ids=[11, 12, 13], block_ids=[7, 8], samples=False),  # chunk, context 4
        SeqStep(start=9, token_ids=[21], block_ids=[3, 5, 6], samples=True),  # decode at position 9
        SeqStep(start=0, token_ids=[31, 32], block_ids=[2], samples=True),  # a whole short prompt
        SeqStep(start=2, token_ids=[41], block_ids=[9], samples=False),  # decode of a prefill-only row
    ]
    inputs = build_inputs(steps, BLOCK, TorchSDPA(), upload)

    assert len(uploads) == 1, "one host-to-device copy a step"
    assert inputs.input_ids.tolist() == [21, 41, 11, 12, 13, 31, 32]
    assert inputs.positions.tolist() == [9, 2, 4, 5, 6, 0, 1]
    meta = inputs.meta
    assert meta.slot_blocks.tolist() == [6, 9, 8, 8, 8, 2, 2]  # block of position p: block_ids[p // 4]
    assert meta.slot_offsets.tolist() == [1, 2, 0, 1, 2, 0, 1]
    assert meta.num_decode_tokens == 2
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    assert meta.decode_block_tables.tolist() == [[3, 5, 6], [9, 0, 0]]  # padded with 0
    assert meta.decode_context_lens.tolist() == [10, 3]
    assert [(p.start, p.end, p.context_len, p.block_table.tolist()) for p in meta.prefills] == [
        (2, 5, 4, [7, 8]),
        (5, 7, 0, [2]),
    ]
    assert meta.prefill_bounds is not None and meta.prefill_bounds.tolist() == [[2, 3, 4], [5, 2, 0]]
    assert inputs.prefill_offsets == {0: 2, 2: 5}
    # the sampling steps' last rows, decodes first: step 1's decode, then step 2's last prompt token
    assert inputs.sampling == [1, 2] and inputs.sample_indices.tolist() == [0, 6]
    assert meta.decode_mask is not None, "the backend's own prepare ran"


def test_a_step_of_decodes_only_has_no_prefill_fields() -> None:
    steps = [SeqStep(5, [3], [1, 2], True), SeqStep(0, [4], [6], True)]
    inputs = build_inputs(steps, BLOCK, TorchSDPA(), lambda v: torch.tensor(v, dtype=torch.long))
    assert (
        inputs.meta.prefills == ()
        and inputs.meta.prefill_bounds is None
        and inputs.meta.prefill_tables is None
    )
    assert inputs.prefill_offsets == {} and inputs.sample_indices.tolist() == [0, 1]
