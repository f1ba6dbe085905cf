"""Splitting tokenized documents into aligned segments."""

from __future__ import annotations

import pytest
import torch
from conftest import CLS, PAD, SEP, encode, random_documents
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_rmt.segmenting import plan_segments


def plan(batch, segment_size=4, alignment="right"):
    return plan_segments(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                         segment_size=segment_size, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD,
                         alignment=alignment)  # fmt: skip


def contents_by_document(segment_plan):
    out = [[] for _ in range(segment_plan.batch_size)]
    for step in range(segment_plan.num_segments):
        segment = segment_plan.segment(step)
        for row, ids, mask in zip(segment.rows.tolist(), segment.input_ids, segment.attention_mask, strict=True):
            assert mask.sum() > 0
            assert mask[: int(mask.sum())].all(), "content must be packed to the left"
            out[row].append(ids[mask.bool()].tolist())
    return out


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    segment_size=st.integers(1, 9),
    alignment=st.sampled_from(["right", "left", "start"]),
    padding_side=st.sampled_from(["right", "left"]),
)
def test_segments_reassemble_each_document_and_end_together(lengths, segment_size, alignment, padding_side):
    documents = random_documents(lengths)
    segment_plan = plan(encode(documents, padding_side), segment_size, alignment)
    per_document = contents_by_document(segment_plan)
    for doc, segments, count in zip(documents, per_document, segment_plan.segments_per_document, strict=True):
        assert sum(segments, []) == doc.tolist()
        assert len(segments) == count == -(-len(doc) // segment_size)
        sizes = [len(s) for s in segments]
        full = sizes[1:] if alignment == "right" else sizes[:-1]
        assert all(size == segment_size for size in full)
    active = segment_plan.active_mask()
    if alignment == "start":
        assert active[:, 0].all(), "every document starts at the first step"
    else:
        assert active[:, -1].all(), "every document's last segment is at the last step"
    assert (active.sum(1) == segment_plan.segments_per_document).all()
    for step in range(segment_plan.num_segments):  # the rows of each step are the active documents
        assert segment_plan.segment(step).rows.tolist() == active[:, step].nonzero().flatten().tolist()


def test_right_alignment_pads_the_first_segment_and_keeps_token_types():
    batch = encode([torch.arange(10, 20)])
    batch["token_type_ids"][0, 6:] = 1
    segment_plan = plan(batch, segment_size=4)
    first = segment_plan.segment(0)
    assert first.input_ids.tolist() == [[10, 11]]
    assert first.attention_mask.tolist() == [[1, 1]]
    types = [segment_plan.segment(s).token_type_ids.tolist()[0] for s in range(3)]
    assert sum(types, []) == [0] * 5 + [1] * 5  # content tokens 10..19 sit at positions 1..10


def test_padding_without_attention_mask_is_an_error():
    batch = encode(random_documents([3, 9]))
    with pytest.raises(ValueError, match="no attention_mask was given"):
        plan_segments(batch["input_ids"], None, None, segment_size=4, cls_token_id=CLS, sep_token_id=SEP,
                      pad_token_id=PAD)  # fmt: skip


def test_empty_document_is_an_error_naming_it():
    batch = encode([torch.arange(5, 9), torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match=r"batch index \[1\]"):
        plan(batch)


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_a_batch_without_tokens_is_an_error(shape):
    with pytest.raises(ValueError, match=rf"input_ids of shape \({shape[0]}, {shape[1]}\) hold no tokens"):
        empty = torch.zeros(shape, dtype=torch.long)
        plan({"input_ids": empty, "attention_mask": empty})


def test_mismatched_mask_shape_is_an_error():
    batch = encode(random_documents([4]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        plan_segments(batch["input_ids"], batch["attention_mask"][:, :-1], None, segment_size=4,
                      cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD)  # fmt: skip
