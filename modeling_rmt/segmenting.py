"""Split a batch of tokenized documents into aligned segments.

Every document is tokenized once by the backbone's tokenizer (`[CLS] content [SEP]`, padded either
side). The special tokens are stripped and the content is cut into segments of `segment_size`
tokens. All documents end at the same step: a document needing fewer segments starts later and
keeps its memory untouched until then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segment:
    """The content of one step for the documents that have tokens in it (its `rows`)."""

    rows: torch.Tensor  # [A] indices of the active documents in the batch
    input_ids: torch.Tensor  # [A, n] content left-packed, padded with pad_token_id
    attention_mask: torch.Tensor  # [A, n] 1 on content
    token_type_ids: torch.Tensor | None  # [A, n] or None


@dataclass
class SegmentPlan:
    """All documents of a batch laid out on a common grid of `num_segments * segment_size` tokens."""

    input_ids: torch.Tensor  # [B, T * S]
    content_mask: torch.Tensor  # [B, T * S] bool
    token_type_ids: torch.Tensor | None
    segments_per_document: torch.Tensor  # [B]
    segment_size: int
    pad_token_id: int

    @property
    def num_segments(self) -> int:
        return self.input_ids.shape[1] // self.segment_size

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def active_mask(self) -> torch.Tensor:
        """[B, T] bool: which documents have content at each step."""
        steps = torch.arange(self.num_segments, device=self.input_ids.device)
        first_step = self.num_segments - self.segments_per_document
        return steps[None, :] >= first_step[:, None]

    def segment(self, step: int) -> Segment:
        """The content of step `step`, left-packed, for the documents active at that step."""
        window = slice(step * self.segment_size, (step + 1) * self.segment_size)
        mask = self.content_mask[:, window]
        rows = mask.any(dim=1).nonzero().squeeze(1)
        mask = mask[rows]
        width = int(mask.sum(dim=1).max())
        # A stable sort moves each row's padding behind its content without reordering tokens.
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
        ids = self.input_ids[rows, window].gather(1, order)
        types = None if self.token_type_ids is None else self.token_type_ids[rows, window].gather(1, order)
        packed_mask = mask.gather(1, order)
        ids = ids.masked_fill(~packed_mask, self.pad_token_id)
        return Segment(rows=rows, input_ids=ids, attention_mask=packed_mask.long(), token_type_ids=types)


def plan_segments(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    *,
    segment_size: int,
    cls_token_id: int | None,
    sep_token_id: int | None,
    pad_token_id: int | None,
    alignment: str = "right",
) -> SegmentPlan:
    """Strip the tokenizer's outer [CLS]/[SEP] and lay every document's content on the segment grid.

    Raises ValueError for inputs that cannot be segmented faithfully (see the messages).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}.")
    if attention_mask is None:
        if pad_token_id is not None and bool((input_ids == pad_token_id).any()):
            raise ValueError(
                "input_ids contain padding (pad_token_id) but no attention_mask was given; pass the "
                "attention_mask the tokenizer returns so padding is not read as text."
            )
        attention_mask = torch.ones_like(input_ids)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}."
        )
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"token_type_ids shape {tuple(token_type_ids.shape)} differs from input_ids {tuple(input_ids.shape)}."
        )
    real = attention_mask.bool()
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    # Content excludes a leading [CLS] and a trailing [SEP] of each document (padding on either side).
    first = torch.where(real, positions, length).min(dim=1).values
    last = torch.where(real, positions, -1).max(dim=1).values
    rows = torch.arange(batch, device=input_ids.device)
    content = real.clone()
    if cls_token_id is not None:
        starts_with_cls = (input_ids[rows, first.clamp(max=length - 1)] == cls_token_id) & (first < length)
        content[rows[starts_with_cls], first[starts_with_cls]] = False
    if sep_token_id is not None:
        ends_with_sep = (input_ids[rows, last.clamp(min=0)] == sep_token_id) & (last >= 0)
        ends_with_sep &= content[rows, last.clamp(min=0)]
        content[rows[ends_with_sep], last[ends_with_sep]] = False
    lengths = content.sum(dim=1)
    if bool((lengths == 0).any()):
        empty = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Document(s) at batch index {empty} have no tokens besides special tokens and padding; "
            "remove empty documents before calling the model."
        )
    segments = (lengths + segment_size - 1) // segment_size
    total = int(segments.max()) * segment_size
    # Destination of every content token on the grid: documents end together on the last step.
    rank = content.long().cumsum(dim=1) - 1  # index of a token within its document's content
    pad_left = total - lengths if alignment == "right" else total - segments * segment_size
    destination = rank + pad_left[:, None]
    fill = pad_token_id if pad_token_id is not None else 0
    grid_ids = input_ids.new_full((batch, total), fill)
    grid_mask = torch.zeros(batch, total, dtype=torch.bool, device=input_ids.device)
    doc_index, token_index = content.nonzero(as_tuple=True)
    grid_ids[doc_index, destination[doc_index, token_index]] = input_ids[doc_index, token_index]
    grid_mask[doc_index, destination[doc_index, token_index]] = True
    grid_types = None
    if token_type_ids is not None:
        grid_types = token_type_ids.new_zeros((batch, total))
        grid_types[doc_index, destination[doc_index, token_index]] = token_type_ids[doc_index, token_index]
    return SegmentPlan(
        input_ids=grid_ids,
        content_mask=grid_mask,
        token_type_ids=grid_types,
        segments_per_document=segments,
        segment_size=segment_size,
        pad_token_id=fill,
    )
